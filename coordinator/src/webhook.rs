//! The webhook hook: the decision POSTed as JSON, signed so the receiver can tell it came from
//! the cluster. `X-Drover-Signature: sha256=HEX` is HMAC-SHA256 of the body under the shared
//! secret; `X-Drover-Decision` carries the decision id, which makes a repeated call idempotent.
//! Plain HTTP, or HTTPS verified against the host's CA bundle.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The signature header's value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Where the host keeps its trusted CA certificates (Debian, RHEL, Alpine).
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

struct Target {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

fn parse(url: &str) -> Result<Target, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("'{url}' is not an http(s) URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in '{url}'"))?),
        None => (authority, if tls { 443 } else { 80 }),
    };
    Ok(Target {
        tls,
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

/// POSTs `body`; a 2xx answer within `timeout` is success.
pub async fn post(
    url: &str,
    secret: &str,
    decision: u64,
    body: &str,
    timeout: Duration,
) -> Result<(), String> {
    tokio::time::timeout(timeout, post_inner(url, secret, decision, body))
        .await
        .map_err(|_| format!("no answer from {url} within {} ms", timeout.as_millis()))?
}

async fn post_inner(url: &str, secret: &str, decision: u64, body: &str) -> Result<(), String> {
    let t = parse(url)?;
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("connecting to {}:{}: {e}", t.host, t.port))?;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Drover-Decision: {decision}\r\nX-Drover-Signature: {}\r\nConnection: close\r\n\r\n{body}",
        t.path,
        t.host,
        body.len(),
        signature(secret, body.as_bytes())
    );
    if t.tls {
        let mut roots = rustls::RootCertStore::empty();
        for path in CA_BUNDLES {
            if let Ok(certs) = rustls::pki_types::CertificateDer::pem_file_iter(path) {
                for c in certs.flatten() {
                    let _ = roots.add(c);
                }
                break;
            }
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| format!("{}: {e}", t.host))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", t.host))?;
        exchange(stream, &request, url).await
    } else {
        exchange(tcp, &request, url).await
    }
}

use rustls::pki_types::pem::PemObject;

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &str,
    url: &str,
) -> Result<(), String> {
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending to {url}: {e}"))?;
    let mut answer = Vec::new();
    let _ = (&mut s).take(64 * 1024).read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{url} gave no HTTP answer"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(format!(
            "{url} answered {status}: {}",
            body.chars().take(300).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
