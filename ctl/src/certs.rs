//! A development certificate authority and role certificates. The role rides in the subject's
//! OrganizationalUnit and the name in its CommonName; coordinators read both on every call.

use std::path::Path;

use drover_proto::identity::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

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
}

fn write(dir: &Path, file: &str, contents: &str, private: bool) -> Result<(), CertError> {
    let path = dir.join(file);
    std::fs::write(&path, contents).map_err(|source| CertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    file_name: &str,
    common_name: &str,
    role: Role,
    extra_sans: &[String],
) -> Result<(), CertError> {
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    sans.extend(extra_sans.iter().cloned());
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::OrganizationName, "Drover");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write(dir, &format!("{file_name}.pem"), &cert.pem(), false)?;
    write(
        dir,
        &format!("{file_name}-key.pem"),
        &key.serialize_pem(),
        true,
    )?;
    Ok(())
}

/// Creates `ca.pem`/`ca-key.pem` and certificates for `coordinators` coordinators
/// (`coordinator-N`), agents (`agent`), and one client per other role (`admin`, `operator`,
/// `submitter`, `viewer`).
pub fn init(
    dir: &Path,
    coordinators: u32,
    extra_sans: &[String],
    force: bool,
) -> Result<Vec<String>, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    if dir.join("ca.pem").exists() && !force {
        return Err(CertError::Exists(dir.display().to_string()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Drover dev CA");
    dn.push(DnType::OrganizationName, "Drover");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    write(dir, "ca.pem", &ca.pem(), false)?;
    write(dir, "ca-key.pem", &ca.key().serialize_pem(), true)?;
    let mut made = vec!["ca".to_owned()];
    for n in 1..=coordinators {
        let name = format!("coordinator-{n}");
        issue_with(&ca, dir, &name, &name, Role::Coordinator, extra_sans)?;
        made.push(name);
    }
    for (name, role) in [
        ("agent", Role::Agent),
        ("admin", Role::Admin),
        ("operator", Role::Operator),
        ("submitter", Role::Submitter),
        ("viewer", Role::Viewer),
    ] {
        issue_with(&ca, dir, name, name, role, extra_sans)?;
        made.push(name.to_owned());
    }
    Ok(made)
}

/// Issues one more certificate from the CA in `dir`.
pub fn issue(dir: &Path, role: &str, name: &str, extra_sans: &[String]) -> Result<(), CertError> {
    let role = Role::parse(role).ok_or_else(|| CertError::UnknownRole(role.to_owned()))?;
    let ca_pem = read(&dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    issue_with(&issuer, dir, name, name, role, extra_sans)
}

#[cfg(test)]
mod tests {
    use drover_proto::identity::{Role, cached_identity};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn identities_read_from_issued_certificates_are_remembered_per_certificate() {
        let dir = tempfile::tempdir().unwrap();
        super::init(dir.path(), 1, &[], false).unwrap();
        let der = |name: &str| {
            CertificateDer::from_pem_file(dir.path().join(format!("{name}.pem"))).unwrap()
        };
        let (agent, viewer) = (der("agent"), der("viewer"));
        for _ in 0..2 {
            // The second round is answered from the cache and must agree with the first.
            let a = cached_identity(agent.as_ref()).unwrap();
            assert_eq!((a.name.as_str(), a.role), ("agent", Role::Agent));
            let v = cached_identity(viewer.as_ref()).unwrap();
            assert_eq!((v.name.as_str(), v.role), ("viewer", Role::Viewer));
        }
        assert!(cached_identity(b"not a certificate").is_err());
    }
}
