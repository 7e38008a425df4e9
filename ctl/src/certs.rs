//! A certificate authority for a cluster and the certificates of its members. The role rides in
//! the subject's OrganizationalUnit and the name in its CommonName; coordinators read both on
//! every call, and agents and clients check that the server they dial carries the coordinator role.
//!
//! Layout of a directory: `ca.pem` (what everyone trusts), `NAME.pem` and `NAME-key.pem` per
//! member, and `private/ca-key.pem`, which signs new certificates and belongs on no node:
//! `certs bundle` copies out only what one member needs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_proto::identity::{Role, identity_from_der};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// How long a member certificate is valid unless `--valid-for` says otherwise.
pub const VALID_FOR_DEFAULT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The CA outlives the certificates it signs, so renewing them never needs a new CA.
const CA_VALID_FOR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Accepted clock skew between the host issuing a certificate and the hosts checking it.
const BACKDATE: Duration = Duration::from_secs(300);
const CA_KEY: &str = "private/ca-key.pem";
/// Where `certs init` put the CA key before it had a directory of its own; still read.
const CA_KEY_OLD: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} already holds a CA (ca.pem); pass --force to replace every certificate in it")]
    Exists(String),
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("unknown role '{0}' (one of coordinator, agent, admin, operator, submitter, viewer)")]
    UnknownRole(String),
    #[error(
        "certificate name '{0}': use 1-253 characters of A-Z, a-z, 0-9, '.', '_', '-', not \
         starting with '.' or '-' (it becomes a file name)"
    )]
    BadName(String),
    #[error("{path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("--valid-for: {0}")]
    ValidFor(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Names become file names, so nothing that could walk out of the directory is accepted.
pub fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(name.to_owned()))
    }
}

/// Writes `contents` to `path` through a new file created with `mode`, renamed into place: a
/// private key is never readable by others, not even between its creation and a chmod, and a
/// failure leaves the old file whole.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), CertError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err(dir))?;
    // An existing directory keeps its mode otherwise.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_err(dir))
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// A certificate and its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `NAME.pem` (0644) and `NAME-key.pem` (0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), CertError> {
        check_name(name)?;
        write_file(&dir.join(format!("{name}-key.pem")), &self.key_pem, 0o600)?;
        write_file(&dir.join(format!("{name}.pem")), &self.cert_pem, 0o644)
    }
}

/// The CA of a directory, able to sign.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

fn validity(params: &mut CertificateParams, valid_for: Duration) -> Result<(), CertError> {
    let now = time::OffsetDateTime::now_utc();
    let span = |d: Duration| {
        time::Duration::try_from(d).map_err(|_| CertError::ValidFor(format!("{d:?} is too long")))
    };
    if valid_for.is_zero() {
        return Err(CertError::ValidFor("must be longer than zero".into()));
    }
    params.not_before = now - span(BACKDATE)?;
    params.not_after = now
        .checked_add(span(valid_for)?)
        .filter(|t| t.year() < 9999)
        .ok_or_else(|| CertError::ValidFor(format!("{valid_for:?} is too long")))?;
    Ok(())
}

impl Authority {
    /// Creates a new CA: `ca.pem` and `private/ca-key.pem`.
    pub fn create(dir: &Path) -> Result<Authority, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Drover CA");
        dn.push(DnType::OrganizationName, "Drover");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALID_FOR)?;
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        create_dir(&dir.join("private"), 0o700)?;
        write_file(&dir.join(CA_KEY), &ca.key().serialize_pem(), 0o600)?;
        write_file(&dir.join("ca.pem"), &ca.pem(), 0o644)?;
        Self::open(dir)
    }

    /// The CA in `dir` (its key from `private/`, or where older versions put it).
    pub fn open(dir: &Path) -> Result<Authority, CertError> {
        let ca_pem = read(&dir.join("ca.pem"))?;
        let key_path = [CA_KEY, CA_KEY_OLD]
            .iter()
            .map(|p| dir.join(p))
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.join(CA_KEY));
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        Ok(Authority {
            issuer: Issuer::from_ca_cert_pem(&ca_pem, key)?,
        })
    }

    /// Signs a new key for `name` in `role`. Only coordinators are servers: theirs alone carry
    /// serverAuth and host names (`localhost`, `127.0.0.1` and `extra_sans`), so no other
    /// member's certificate can stand in for a coordinator.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        extra_sans: &[String],
        valid_for: Duration,
    ) -> Result<Issued, CertError> {
        check_name(name)?;
        let server = role == Role::Coordinator;
        let sans = if server {
            let mut s = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            s.extend(extra_sans.iter().cloned());
            s
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::OrganizationName, "Drover");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            // Coordinators are also clients, of each other.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        validity(&mut params, valid_for)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Creates the CA and certificates for `coordinators` coordinators (`coordinator-N`) and one
/// client per client role (`admin`, `operator`, `submitter`, `viewer`). Agents get theirs one by
/// one (`issue --role agent --name NAME`): an agent registers under its certificate's name.
pub fn init(
    dir: &Path,
    coordinators: u32,
    extra_sans: &[String],
    force: bool,
    valid_for: Duration,
) -> Result<Vec<String>, CertError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    if dir.join("ca.pem").exists() && !force {
        return Err(CertError::Exists(dir.display().to_string()));
    }
    let ca = Authority::create(dir)?;
    let _ = std::fs::remove_file(dir.join(CA_KEY_OLD));
    let mut made = vec!["ca".to_owned()];
    let members = (1..=coordinators)
        .map(|n| (format!("coordinator-{n}"), Role::Coordinator))
        .chain(
            [Role::Admin, Role::Operator, Role::Submitter, Role::Viewer]
                .into_iter()
                .map(|r| (r.as_str().to_owned(), r)),
        );
    for (name, role) in members {
        ca.issue(role, &name, extra_sans, valid_for)?
            .write(dir, &name)?;
        made.push(name);
    }
    Ok(made)
}

/// Issues one more certificate from the CA in `dir`.
pub fn issue(
    dir: &Path,
    role: &str,
    name: &str,
    extra_sans: &[String],
    valid_for: Duration,
) -> Result<(), CertError> {
    let role = Role::parse(role).ok_or_else(|| CertError::UnknownRole(role.to_owned()))?;
    check_name(name)?;
    Authority::open(dir)?
        .issue(role, name, extra_sans, valid_for)?
        .write(dir, name)
}

/// What a certificate in a directory says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub name: String,
    pub role: Role,
    /// Host names and addresses (coordinators only).
    pub sans: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// Reads `NAME.pem` in `dir`.
pub fn inspect(dir: &Path, name: &str) -> Result<CertInfo, CertError> {
    check_name(name)?;
    let path = dir.join(format!("{name}.pem"));
    let unreadable = |message: String| CertError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let der = CertificateDer::from_pem_file(&path).map_err(|e| unreadable(e.to_string()))?;
    let id = identity_from_der(der.as_ref()).map_err(unreadable)?;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| unreadable(e.to_string()))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => sans.push((*d).to_owned()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    sans.extend(ip.map(|i| i.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        name: id.name,
        role: id.role,
        sans,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Every member certificate in `dir` (not the CA), by name.
pub fn list(dir: &Path) -> Result<Vec<CertInfo>, CertError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".pem")) else {
            continue;
        };
        if name == "ca" || name.ends_with("-key") || check_name(name).is_err() {
            continue;
        }
        out.push(inspect(dir, name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Issues `names` again (new keys) with the role, name and host names they carry, valid for
/// `valid_for` from now. Members pick the new files up when they next start.
pub fn renew(
    dir: &Path,
    names: &[String],
    valid_for: Duration,
) -> Result<Vec<CertInfo>, CertError> {
    let ca = Authority::open(dir)?;
    let mut renewed = Vec::new();
    for name in names {
        let old = inspect(dir, name)?;
        // Host names are re-issued as extras: `issue` adds localhost and 127.0.0.1 itself.
        let extra: Vec<String> = old
            .sans
            .iter()
            .filter(|s| *s != "localhost" && *s != "127.0.0.1")
            .cloned()
            .collect();
        ca.issue(old.role, name, &extra, valid_for)?
            .write(dir, name)?;
        renewed.push(inspect(dir, name)?);
    }
    Ok(renewed)
}

/// Copies what member `name` needs (`ca.pem`, `NAME.pem`, `NAME-key.pem`) into `out`, and
/// nothing else: no CA key, no other member's key.
pub fn bundle(dir: &Path, name: &str, out: &Path) -> Result<PathBuf, CertError> {
    check_name(name)?;
    create_dir(out, 0o700)?;
    for (file, mode) in [
        ("ca.pem".to_owned(), 0o644),
        (format!("{name}.pem"), 0o644),
        (format!("{name}-key.pem"), 0o600),
    ] {
        write_file(&out.join(&file), &read(&dir.join(&file))?, mode)?;
    }
    Ok(out.to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use drover_proto::identity::{Role, cached_identity};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identities_read_from_issued_certificates_are_remembered_per_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1, &[], false, VALID_FOR_DEFAULT).unwrap();
        issue(dir.path(), "agent", "worker-1", &[], VALID_FOR_DEFAULT).unwrap();
        let der = |name: &str| {
            CertificateDer::from_pem_file(dir.path().join(format!("{name}.pem"))).unwrap()
        };
        let (agent, viewer) = (der("worker-1"), der("viewer"));
        for _ in 0..2 {
            // The second round is answered from the cache and must agree with the first.
            let a = cached_identity(agent.as_ref()).unwrap();
            assert_eq!((a.name.as_str(), a.role), ("worker-1", Role::Agent));
            let v = cached_identity(viewer.as_ref()).unwrap();
            assert_eq!((v.name.as_str(), v.role), ("viewer", Role::Viewer));
        }
        assert!(cached_identity(b"not a certificate").is_err());
    }

    #[test]
    fn keys_are_private_from_creation_and_the_ca_key_sits_apart() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1, &[], false, VALID_FOR_DEFAULT).unwrap();
        assert_eq!(mode(&dir.path().join("coordinator-1-key.pem")), 0o600);
        assert_eq!(mode(&dir.path().join("coordinator-1.pem")), 0o644);
        assert_eq!(mode(&dir.path().join("private")), 0o700);
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert!(!dir.path().join(CA_KEY_OLD).exists());
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A bundle holds what one member needs and nothing else.
        let out = dir.path().join("for-node-1");
        bundle(dir.path(), "coordinator-1", &out).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["ca.pem", "coordinator-1-key.pem", "coordinator-1.pem"]
        );
        assert_eq!(mode(&out.join("coordinator-1-key.pem")), 0o600);
        assert_eq!(mode(&out), 0o700);
    }

    #[test]
    fn a_failing_key_write_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1, &[], false, VALID_FOR_DEFAULT).unwrap();
        // The target exists as a directory: the rename cannot replace it.
        std::fs::create_dir(dir.path().join("w-key.pem")).unwrap();
        let e = issue(dir.path(), "agent", "w", &[], VALID_FOR_DEFAULT).unwrap_err();
        assert!(e.to_string().contains("w-key.pem"), "{e}");
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1, &[], false, VALID_FOR_DEFAULT).unwrap();
        for bad in [
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "",
            "sp ace",
            &"x".repeat(254),
        ] {
            let e = issue(dir.path(), "agent", bad, &[], VALID_FOR_DEFAULT).unwrap_err();
            assert!(matches!(e, CertError::BadName(_)), "{bad}: {e}");
        }
        assert!(!dir.path().parent().unwrap().join("x.pem").exists());
    }

    #[test]
    fn only_coordinators_carry_host_names_and_every_certificate_expires() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            1,
            &["node-a.example".into()],
            false,
            VALID_FOR_DEFAULT,
        )
        .unwrap();
        issue(
            dir.path(),
            "agent",
            "w",
            &["ignored.example".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        let c = inspect(dir.path(), "coordinator-1").unwrap();
        assert_eq!(c.role, Role::Coordinator);
        assert_eq!(c.sans, ["localhost", "127.0.0.1", "node-a.example"]);
        let a = inspect(dir.path(), "w").unwrap();
        assert!(a.sans.is_empty(), "{:?}", a.sans);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(
            (a.not_after - now - 3600).abs() < 60,
            "{}",
            a.not_after - now
        );
        let year = VALID_FOR_DEFAULT.as_secs() as i64;
        assert!((c.not_after - now - year).abs() < 60);
        let e = issue(dir.path(), "agent", "z", &[], Duration::ZERO).unwrap_err();
        assert!(matches!(e, CertError::ValidFor(_)), "{e}");
    }

    #[test]
    fn renewing_keeps_role_name_and_host_names_with_a_new_key_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            1,
            &["node-a.example".into()],
            false,
            Duration::from_secs(60),
        )
        .unwrap();
        let old_key = std::fs::read_to_string(dir.path().join("coordinator-1-key.pem")).unwrap();
        let before = inspect(dir.path(), "coordinator-1").unwrap();
        let renewed = renew(
            dir.path(),
            &["coordinator-1".into()],
            Duration::from_secs(30 * 24 * 3600),
        )
        .unwrap();
        assert_eq!(renewed[0].role, before.role);
        assert_eq!(renewed[0].sans, before.sans);
        assert!(renewed[0].not_after > before.not_after + 29 * 24 * 3600);
        let new_key = std::fs::read_to_string(dir.path().join("coordinator-1-key.pem")).unwrap();
        assert_ne!(old_key, new_key);
        let names: Vec<String> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            ["admin", "coordinator-1", "operator", "submitter", "viewer"]
        );
    }
}
