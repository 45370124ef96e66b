//! TLS for client connections: STARTTLS (RFC 6120 §5) and direct TLS (XEP-0368) share one
//! rustls server configuration, built from PEM files or from a self-signed certificate that
//! is generated into the data directory for development.
//!
//! The crypto provider is chosen explicitly (ring) rather than taken from the process
//! default: other parts of the workspace enable more than one rustls provider, and the
//! implicit `ServerConfig::builder()` panics when it cannot pick one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol a direct-TLS XMPP client offers (XEP-0368 §3).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The certificate could not be generated.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate and key.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_error(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(cert, e))?;
        if certs.is_empty() {
            return Err(file_error(cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
        Ok(Self { certs, key })
    }

    /// The development identity for `domain`: `<dir>/xmpp-<domain>.crt` and `.key`, generated
    /// self-signed (for `domain` and `pubsub.<domain>`) on first use and reused after.
    pub fn self_signed(domain: &str, dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(format!("xmpp-{domain}.crt"));
        let key_path = dir.join(format!("xmpp-{domain}.key"));
        if !cert_path.exists() || !key_path.exists() {
            let names = vec![domain.to_owned(), format!("pubsub.{domain}")];
            let generated = rcgen::generate_simple_self_signed(names)
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
            write_private(&key_path, generated.key_pair.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, generated.cert.pem())
                .map_err(|e| file_error(&cert_path, e))?;
        }
        Self::from_pem_files(&cert_path, &key_path)
    }

    /// A rustls server configuration for this identity, offering `alpn` protocols.
    pub fn server_config(self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs, self.key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Writes a key file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(bytes).map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn a_self_signed_identity_is_generated_once_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::self_signed("example.org", dir.path()).expect("generated");
        let again = Identity::self_signed("example.org", dir.path()).expect("loaded");
        assert_eq!(first.certs, again.certs);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("xmpp-example.org.key"))
                .expect("key file")
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key is private");
    }

    #[test]
    fn missing_or_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        let err = Identity::from_pem_files(&garbage, &garbage).expect_err("refused");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        assert!(Identity::from_pem_files(&missing, &missing).is_err());
    }

    #[tokio::test]
    async fn a_client_that_trusts_the_certificate_completes_a_handshake_and_talks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::self_signed("localhost", dir.path()).expect("identity");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.certs[0].clone()).expect("root");
        let server_config = identity.server_config(&[ALPN_XMPP_CLIENT]).expect("config");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];

        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await.expect("server handshake");
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.expect("read");
            tls.write_all(b"pong!").await.expect("write");
            tls.flush().await.expect("flush");
            (alpn, buf)
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector
            .connect(name, client_io)
            .await
            .expect("client handshake");
        tls.write_all(b"ping!").await.expect("write");
        tls.flush().await.expect("flush");
        let mut reply = [0u8; 5];
        tls.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"pong!");
        let (alpn, got) = server.await.expect("server task");
        assert_eq!(&got, b"ping!");
        assert_eq!(alpn.as_deref(), Some(ALPN_XMPP_CLIENT));
    }
}
