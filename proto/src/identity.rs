//! Identity is the certificate: the role sits in the subject's OrganizationalUnit, the name in
//! its CommonName. Every RPC handler reads the verified peer certificate through this module.

use std::fmt;

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Coordinator,
    Agent,
    Admin,
    Operator,
    Submitter,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Coordinator,
        Role::Agent,
        Role::Admin,
        Role::Operator,
        Role::Submitter,
        Role::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// May read runs, agents and cluster state.
    pub fn can_read(self) -> bool {
        matches!(
            self,
            Role::Admin | Role::Operator | Role::Submitter | Role::Viewer | Role::Coordinator
        )
    }

    /// May submit and cancel runs.
    pub fn can_submit(self) -> bool {
        matches!(self, Role::Admin | Role::Operator | Role::Submitter)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a verified mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
}

/// Reads the role and name from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_owned();
    let role_text = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .ok_or_else(|| format!("certificate '{name}' carries no role (subject OU)"))?;
    let role = Role::parse(role_text)
        .ok_or_else(|| format!("certificate '{name}' carries unknown role '{role_text}'"))?;
    Ok(PeerIdentity { name, role })
}

/// The verified identity of the caller. The TLS layer has already checked the chain against our CA;
/// this only reads what the certificate says.
pub fn peer_identity<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    cached_identity(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// Certificates already read, by their DER bytes. Parsing one took ~60 us on every RPC, on the
/// path of every submission and of every Raft append a follower receives; the peers of a node
/// are few (its agents, clients and fellow coordinators), so past the bound the cache just
/// starts over.
const IDENTITIES_CACHED_MAX: usize = 16_384;

/// [`identity_from_der`], remembered per certificate.
pub fn cached_identity(der: &[u8]) -> Result<PeerIdentity, String> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<Vec<u8>, PeerIdentity>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(id) = cache.lock().unwrap().get(der) {
        return Ok(id.clone());
    }
    let id = identity_from_der(der)?;
    let mut cache = cache.lock().unwrap();
    if cache.len() >= IDENTITIES_CACHED_MAX {
        cache.clear();
    }
    cache.insert(der.to_vec(), id.clone());
    Ok(id)
}

/// Checks the caller holds one of `allowed`; the error names the roles that would do.
pub fn require_role<T>(
    req: &Request<T>,
    action: &str,
    allowed: &[Role],
) -> Result<PeerIdentity, Status> {
    let id = peer_identity(req)?;
    if allowed.contains(&id.role) {
        return Ok(id);
    }
    let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
    Err(Status::permission_denied(format!(
        "{action} needs role {}; certificate '{}' has role '{}'",
        names.join(" or "),
        id.name,
        id.role
    )))
}
