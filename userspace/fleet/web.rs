//! `--web-config FILE`: TLS and basic authentication for `/metrics`, in the web
//! configuration format of Prometheus's exporter-toolkit (what node_exporter and the other
//! official exporters read), so one file serves the whole fleet. Supported:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/tcpconnlat/server.crt      # PEM, with its chain
//!   key_file: /etc/tcpconnlat/server.key       # PEM
//!   client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (the default),
//!                                                  # VerifyClientCertIfGiven
//!   client_ca_file: /etc/tcpconnlat/clients-ca.crt
//!   min_version: TLS12                          # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...                      # bcrypt hashes
//! ```
//!
//! Any other key is refused by name; relative paths are relative to the file. As with the
//! toolkit, certificate, key and CA files are read again when they change (checked at each new connection), so a rotated
//! certificate needs no restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::auth::BasicAuth;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: ClientAuth,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
}

/// `client_auth_type`: the toolkit's names for Go's tls.ClientAuthType.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum TlsVersion {
    TLS12,
    TLS13,
}

/// What `--web-config` asks for, checked.
#[derive(Debug, Default)]
pub struct WebConfig {
    pub tls: Option<TlsFiles>,
    pub basic_auth: Option<BasicAuth>,
}

/// Where the TLS material is, and how clients are asked for certificates.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_auth: ClientAuth,
    client_ca: Option<PathBuf>,
    min_version: Option<TlsVersion>,
}

impl WebConfig {
    /// Read and check `path`: a bad file is one error naming the key at fault.
    pub fn read(path: &Path) -> Result<WebConfig> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--web-config {shown}: cannot read it"))?;
        let file: WebConfigFile = serde_saphyr::from_str(&text).map_err(|e| {
            let one_line = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            anyhow!("--web-config {shown}: {one_line}")
        })?;
        // Relative paths are relative to the file, as the toolkit reads them.
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file.tls_server_config.map(|t| TlsFiles {
            cert: dir.join(t.cert_file),
            key: dir.join(t.key_file),
            client_auth: t.client_auth_type,
            client_ca: t.client_ca_file.map(|ca| dir.join(ca)),
            min_version: t.min_version,
        });
        let config = WebConfig {
            basic_auth: (!file.basic_auth_users.is_empty())
                .then(|| BasicAuth::new(file.basic_auth_users))
                .transpose()
                .with_context(|| format!("--web-config {shown}"))?,
            tls,
        };
        if let Some(tls) = &config.tls {
            // Read now: a missing or bad file fails at start-up, not at the first scrape.
            tls.server_config()
                .with_context(|| format!("--web-config {shown}: tls_server_config"))?;
        }
        Ok(config)
    }
}

impl TlsFiles {
    /// A rustls configuration from the files as they are now.
    fn server_config(&self) -> Result<ServerConfig> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| anyhow!("cert_file {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("cert_file {}: no certificate in it", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| anyhow!("key_file {}: {e}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            Some(TlsVersion::TLS13) => &[&rustls::version::TLS13],
            _ => rustls::ALL_VERSIONS,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| anyhow!("min_version: {e}"))?;
        let builder = match (self.client_auth, &self.client_ca) {
            (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
            (_, None) => bail!(
                "client_auth_type {:?} needs client_ca_file",
                self.client_auth
            ),
            (auth, Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| anyhow!("client_ca_file {}: {e}", ca.display()))?
                {
                    let cert = cert.map_err(|e| anyhow!("client_ca_file {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| anyhow!("client_ca_file {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = match auth {
                    ClientAuth::VerifyClientCertIfGiven => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| anyhow!("client_ca_file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| anyhow!("cert_file and key_file: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    fn files(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// When the files last changed (a missing one reads as never).
    fn changed(&self) -> Vec<Option<SystemTime>> {
        self.files()
            .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// The TLS configuration in use, made again when its files change. A reload that fails
/// (a certificate half-written) keeps the last good one and says so once.
pub struct Tls {
    files: TlsFiles,
    current: Mutex<(Vec<Option<SystemTime>>, Arc<ServerConfig>)>,
}

impl Tls {
    pub fn new(files: TlsFiles) -> Result<Tls> {
        let stamp = files.changed();
        let config = Arc::new(files.server_config()?);
        Ok(Tls {
            files,
            current: Mutex::new((stamp, config)),
        })
    }

    /// The configuration for a new connection, from the files as they are now.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = self.files.changed();
        if stamp != current.0 {
            current.0 = stamp;
            match self.files.server_config() {
                Ok(config) => {
                    current.1 = Arc::new(config);
                    note!("tcpconnlat: --web-config: TLS files changed; read them again");
                }
                Err(e) => note!(
                    "tcpconnlat: --web-config: TLS files changed but cannot be used ({e:#}); keeping the last ones"
                ),
            }
        }
        current.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<WebConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, text).unwrap();
        WebConfig::read(&path)
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = read("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cipher_suites"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let err = read("http_server_config:\n  http2: true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_server_config"), "{err}");
    }

    #[test]
    fn bad_values_and_missing_files_are_named() {
        let err = read("basic_auth_users:\n  alice: plaintext\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("alice: not a bcrypt hash"),
            "{err:#}"
        );
        let err = read("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /k\n")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("cert_file /nonexistent.crt"),
            "{err:#}"
        );
        let err = read("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n")
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS10"), "{err:#}");
    }

    /// A self-signed certificate and key for `name`, as PEM.
    fn certificate(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn changed_tls_files_are_read_again_and_bad_ones_keep_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("s.crt"), dir.path().join("s.key"));
        let write = |(c, k): (String, String)| {
            std::fs::write(&cert, c).unwrap();
            std::fs::write(&key, k).unwrap();
        };
        write(certificate("first"));
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_auth: ClientAuth::NoClientCert,
            client_ca: None,
            min_version: None,
        };
        let tls = Tls::new(files).unwrap();
        let first = tls.config();
        assert!(Arc::ptr_eq(&first, &tls.config()), "read again unchanged");
        // mtimes have a granularity: make the change visible.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(certificate("second"));
        let second = tls.config();
        assert!(!Arc::ptr_eq(&first, &second), "not read again");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&cert, "half a certificate").unwrap();
        assert!(
            Arc::ptr_eq(&second, &tls.config()),
            "a bad file replaced a good one"
        );
    }
}
