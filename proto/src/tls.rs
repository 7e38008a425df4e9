//! Loading the PEM files that make up a node's identity, and turning them into rustls configs.
//!
//! A TLS directory made by `droverctl certs init` holds `ca.pem` and, for each identity NAME,
//! `NAME.pem` (certificate) and `NAME-key.pem` (private key).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read {what} at {path}: {cause} (create certificates with `droverctl certs init --dir DIR`)"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what} at {path} is not PEM (expected a '-----BEGIN' block)")]
    NotPem { what: &'static str, path: PathBuf },
}

/// Where the three PEM files of one identity live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The conventional layout: `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME-key.pem`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial::from_pem(
            read_pem("CA certificate", &self.ca)?,
            read_pem("certificate", &self.cert)?,
            read_pem("private key", &self.key)?,
        ))
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|cause| TlsError::Read {
        what,
        path: path.to_owned(),
        cause,
    })?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// The PEM bytes of one identity and the CA it trusts.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Built on first use and shared by every connection made with this identity.
    client: Arc<OnceLock<Result<Arc<rustls::ClientConfig>, String>>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

impl TlsMaterial {
    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        Self {
            ca_pem,
            cert_pem,
            key_pem,
            client: Arc::default(),
        }
    }

    /// Server side: present our certificate and require a client certificate signed by our CA;
    /// HTTP/2 only. A rustls config rather than tonic's, because the coordinator runs the
    /// handshakes itself (it bounds how many run at once).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let verifier = rustls::server::WebPkiClientVerifier::builder(self.roots()?.into())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("private key: {e}"))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert_pem, "certificate")?, key)
            .map_err(|e| format!("certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The role and name our own certificate carries.
    pub fn own_identity(&self) -> Result<crate::identity::PeerIdentity, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let leaf = CertificateDer::pem_slice_iter(&self.cert_pem)
            .next()
            .ok_or("no certificate in the PEM")?
            .map_err(|e| e.to_string())?;
        crate::identity::identity_from_der(leaf.as_ref())
    }

    /// Client side: trust only our CA, present our certificate, and accept only a server whose
    /// certificate names the host dialled and carries the coordinator role. The CA signs agents'
    /// and clients' certificates too; without the role check, any of them (or a stolen one)
    /// could stand in for a coordinator and collect agents' assignments or clients' specs.
    pub fn coordinator_client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.client
            .get_or_init(|| self.build_client_config())
            .clone()
    }

    fn build_client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let roots = self.roots()?;
        let inner = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| format!("server verifier: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("private key: {e}"))?;
        let mut config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CoordinatorOnly { inner }))
            .with_client_auth_cert(certs(&self.cert_pem, "certificate")?, key)
            .map_err(|e| format!("certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&self.ca_pem, "CA certificate")? {
            roots.add(ca).map_err(|e| format!("CA certificate: {e}"))?;
        }
        Ok(roots)
    }
}

fn certs(
    pem: &[u8],
    what: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: {e}"))
}

/// The standard chain and host-name checks, then the role: only a coordinator may serve.
#[derive(Debug)]
pub struct CoordinatorOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for CoordinatorOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = crate::identity::cached_identity(end_entity.as_ref())
            .map_err(rustls::Error::General)?;
        if id.role != crate::identity::Role::Coordinator {
            return Err(rustls::Error::General(format!(
                "the server's certificate '{}' has role '{}': only a coordinator may serve",
                id.name, id.role
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };

    use super::*;

    fn member(ca: &CertifiedIssuer<'_, KeyPair>, role: &str, name: &str) -> TlsMaterial {
        // Both carry what a server needs (host names, serverAuth): only the role differs.
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, role);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, ca).unwrap();
        TlsMaterial::from_pem(
            ca.pem().into_bytes(),
            cert.pem().into_bytes(),
            key.serialize_pem().into_bytes(),
        )
    }

    /// Handshakes a client holding `client` with a server presenting `server`.
    async fn handshake(server: &TlsMaterial, client: &TlsMaterial) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let result = tokio_rustls::TlsConnector::from(client.coordinator_client_config()?)
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), serve).await;
        result
    }

    #[tokio::test]
    async fn clients_accept_only_a_server_whose_certificate_is_a_coordinators() {
        crate::tls::install_crypto_provider();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let client = member(&ca, "admin", "admin");
        handshake(&member(&ca, "coordinator", "coordinator-1"), &client)
            .await
            .unwrap();
        let e = handshake(&member(&ca, "agent", "worker-1"), &client)
            .await
            .unwrap_err();
        assert!(
            e.contains("'worker-1' has role 'agent': only a coordinator may serve"),
            "{e}"
        );
    }
}
