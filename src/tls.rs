//! TLS for the broker, the result backend and MongoDB, configured the way
//! kombu, Celery and omega|ml read it.
//!
//! * **Broker / Redis result backend.** `amqps://` and `rediss://` URLs use
//!   TLS; so does `amqp://` when `OMEGA_USESSL` is on (omega|ml sets Celery's
//!   `broker_use_ssl = OMEGA_USESSL`, and py-amqp then wraps the socket in TLS,
//!   port 5671 by default). kombu's Redis transport ignores a boolean
//!   `broker_use_ssl`, so `redis://` stays plain, as it does there. kombu's
//!   `ssl_*` URL parameters ([`UrlTlsParams`]: `ssl_cert_reqs`, `ssl_ca_certs`,
//!   `ssl_certfile`, `ssl_keyfile`, `ssl_check_hostname`) are read off every
//!   broker and backend URL ([`split_ssl_params`]) and mean what they mean to
//!   Python's `ssl` module.
//! * **Trust.** `ssl_ca_certs` is the only CA trusted for that URL (Python's
//!   `cafile`). Without it the system roots are trusted (`SSL_CERT_FILE` /
//!   `SSL_CERT_DIR` honoured, as OpenSSL's default paths are for the Python
//!   clients) plus the worker-wide CA (`CA_CERTS_PATH` / `--ca-certs`, which
//!   omega|ml uses for MongoDB): a CA meant for MongoDB never makes a broker
//!   with a public certificate fail.
//! * **Verification is on by default**, also for a bare `rediss://` URL, where
//!   kombu falls back to `CERT_NONE` with a warning: `ssl_cert_reqs=none`
//!   asks for kombu's behaviour explicitly.
//! * **MongoDB** ([`mongo_client_url`]): omega|ml passes
//!   `tls=OMEGA_USESSL, tlsCAFile=CA_CERTS_PATH` to pymongo as keyword
//!   arguments, which win over the URL; the same two options are set on the
//!   URL om-worker's own MongoDB client parses. `tls=true&tlsCAFile=...` in
//!   the URL itself works without `OMEGA_USESSL`.
//! * **Errors** ([`explain`]): a certificate the worker does not trust is a
//!   configuration error, not an outage. The text says which check failed
//!   (unknown CA, host name, expired, client certificate refused, not TLS at
//!   all) and which CA was used, so start-up fails with one precise line.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A URL parameter is unknown or malformed.
    #[error("invalid TLS parameter {name}: {reason}")]
    Param {
        /// The parameter (`ssl_cert_reqs`, ...).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate or key file cannot be read or holds nothing usable.
    #[error("TLS {what} {path}: {reason}")]
    File {
        /// `CA file`, `client certificate`, `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Python's `ssl.VerifyMode`, as kombu reads `ssl_cert_reqs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqs {
    /// `CERT_REQUIRED`: verify the server's certificate.
    Required,
    /// `CERT_OPTIONAL`: for a client the same as required (a TLS server always
    /// presents a certificate).
    Optional,
    /// `CERT_NONE`: accept any certificate (kombu's default for `rediss://`).
    None,
}

impl FromStr for CertReqs {
    type Err = String;
    /// kombu's `parse_ssl_cert_reqs` names (`required`, `CERT_REQUIRED`, ...).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" | "CERT_REQUIRED" => Ok(CertReqs::Required),
            "optional" | "CERT_OPTIONAL" => Ok(CertReqs::Optional),
            "none" | "CERT_NONE" => Ok(CertReqs::None),
            _ => Err(format!(
                "{s:?} (expected required, optional, none or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"
            )),
        }
    }
}

/// kombu's `ssl_*` URL query parameters (`kombu/utils/url.py:parse_url`,
/// Celery's Redis backend), each `None` when absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UrlTlsParams {
    /// `ssl_cert_reqs`.
    pub cert_reqs: Option<CertReqs>,
    /// `ssl_ca_certs`: CA bundle (PEM).
    pub ca_certs: Option<PathBuf>,
    /// `ssl_certfile`: client certificate chain (PEM), for mutual TLS.
    pub certfile: Option<PathBuf>,
    /// `ssl_keyfile`: client key (PEM); else the key is read from `certfile`.
    pub keyfile: Option<PathBuf>,
    /// `ssl_check_hostname` (kombu: anything but `false` is true).
    pub check_hostname: Option<bool>,
}

impl UrlTlsParams {
    /// True when any parameter was given.
    pub fn any(&self) -> bool {
        *self != UrlTlsParams::default()
    }
}

/// Removes kombu's `ssl_*` parameters from `url`'s query and returns the URL
/// without them (otherwise unchanged) and the parameters. Other query
/// parameters stay where they are.
pub fn split_ssl_params(url: &str) -> Result<(String, UrlTlsParams), TlsError> {
    let (head, fragment) = match url.split_once('#') {
        Some((h, f)) => (h, Some(f)),
        None => (url, None),
    };
    let Some((base, query)) = head.split_once('?') else {
        return Ok((url.to_owned(), UrlTlsParams::default()));
    };
    let mut params = UrlTlsParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !key.starts_with("ssl_") {
            kept.push(pair);
            continue;
        }
        let bad = |reason: String| TlsError::Param {
            name: key.to_owned(),
            reason,
        };
        let value = percent_decode(value).ok_or_else(|| bad("invalid percent-encoding".into()))?;
        let path = || {
            if value.is_empty() {
                Err(bad("empty path".into()))
            } else {
                Ok(Some(PathBuf::from(&value)))
            }
        };
        match key {
            "ssl_cert_reqs" => params.cert_reqs = Some(value.parse().map_err(bad)?),
            "ssl_ca_certs" => params.ca_certs = path()?,
            "ssl_certfile" => params.certfile = path()?,
            "ssl_keyfile" => params.keyfile = path()?,
            "ssl_check_hostname" => {
                params.check_hostname = Some(!value.eq_ignore_ascii_case("false"))
            }
            _ => {
                return Err(bad(
                    "unknown (supported: ssl_cert_reqs, ssl_ca_certs, ssl_certfile, \
                     ssl_keyfile, ssl_check_hostname)"
                        .into(),
                ))
            }
        }
    }
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Ok((out, params))
}

/// The worker-wide TLS settings (`OMEGA_USESSL`, `CA_CERTS_PATH`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerTls {
    /// `OMEGA_USESSL` / `--use-ssl`.
    pub use_ssl: bool,
    /// `CA_CERTS_PATH` / `--ca-certs`.
    pub ca_certs: Option<PathBuf>,
}

/// For a broker or Redis backend URL: the URL to hand the driver (kombu's
/// `ssl_*` parameters removed, `amqp`/`redis` switched to `amqps`/`rediss`
/// where kombu would use TLS) and the TLS settings, `None` for plain TCP.
///
/// TLS when the scheme says so (`amqps`, `pyamqps`, `rediss`), for `amqp://`
/// with `OMEGA_USESSL` (Celery's `broker_use_ssl=True`), and when the URL
/// carries `ssl_*` parameters (kombu then passes them as its `ssl` options).
pub fn for_url(url: &str, worker: &WorkerTls) -> Result<(String, Option<TlsSettings>), TlsError> {
    let (stripped, params) = split_ssl_params(url)?;
    let Some((scheme, rest)) = stripped.split_once("://") else {
        return Ok((stripped, None));
    };
    let (scheme, tls) = match scheme {
        "amqps" | "pyamqps" => ("amqps", true),
        "amqp" | "pyamqp" if worker.use_ssl || params.any() => ("amqps", true),
        "rediss" => ("rediss", true),
        "redis" if params.any() => ("rediss", true),
        other => (other, false),
    };
    if !tls {
        if params.any() {
            return Err(TlsError::Param {
                name: "ssl_*".into(),
                reason: format!("TLS parameters on a {scheme}:// URL, which cannot use TLS"),
            });
        }
        return Ok((stripped, None));
    }
    let settings = TlsSettings::new(&params, worker.ca_certs.as_deref())?;
    Ok((format!("{scheme}://{rest}"), Some(settings)))
}

/// The TLS one connection uses: the URL's parameters over the worker-wide
/// CA (see the module docs for the trust rules).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// Verify the server's certificate (`ssl_cert_reqs` other than `none`).
    pub verify: bool,
    /// Check that the certificate names the host connected to.
    pub check_hostname: bool,
    /// The only CA trusted (`ssl_ca_certs`).
    pub ca_certs: Option<PathBuf>,
    /// A CA trusted besides the system roots (`CA_CERTS_PATH` / `--ca-certs`).
    pub extra_ca: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (`ssl_certfile`).
    pub certfile: Option<PathBuf>,
    /// Client key (`ssl_keyfile`; else in `certfile`).
    pub keyfile: Option<PathBuf>,
}

impl TlsSettings {
    /// Combines a URL's parameters with the worker-wide CA.
    pub fn new(params: &UrlTlsParams, extra_ca: Option<&Path>) -> Result<Self, TlsError> {
        if params.keyfile.is_some() && params.certfile.is_none() {
            return Err(TlsError::Param {
                name: "ssl_keyfile".into(),
                reason: "needs ssl_certfile".into(),
            });
        }
        Ok(TlsSettings {
            verify: params.cert_reqs != Some(CertReqs::None),
            check_hostname: params.check_hostname.unwrap_or(true),
            ca_certs: params.ca_certs.clone(),
            extra_ca: extra_ca.map(Path::to_path_buf),
            certfile: params.certfile.clone(),
            keyfile: params.keyfile.clone(),
        })
    }

    /// What is trusted, for log lines and error messages (paths only).
    pub fn trust(&self) -> String {
        if !self.verify {
            return "certificate not verified (ssl_cert_reqs=none)".into();
        }
        let roots = match (&self.ca_certs, &self.extra_ca) {
            (Some(ca), _) => format!("CA file {} (ssl_ca_certs)", ca.display()),
            (None, Some(ca)) => format!("system roots + CA file {}", ca.display()),
            (None, None) => "system roots (SSL_CERT_FILE/SSL_CERT_DIR)".into(),
        };
        if self.check_hostname {
            roots
        } else {
            format!("{roots}, host name not checked")
        }
    }

    /// The certificates trusted, DER, in the order they are read.
    fn roots(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        if let Some(ca) = &self.ca_certs {
            return read_certs(ca, "CA file");
        }
        let mut roots = rustls_native_certs::load_native_certs().certs;
        if let Some(ca) = &self.extra_ca {
            roots.extend(read_certs(ca, "CA file")?);
        }
        Ok(roots)
    }

    fn client_identity(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        let Some(certfile) = &self.certfile else {
            return Ok(None);
        };
        let chain = read_certs(certfile, "client certificate")?;
        let keyfile = self.keyfile.as_deref().unwrap_or(certfile);
        let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| TlsError::File {
            what: "client key",
            path: keyfile.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Some((chain, key)))
    }

    /// A rustls client configuration (AMQP), built once per broker.
    pub fn rustls_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if !self.verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        } else {
            let mut store = RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(self.roots()?);
            if added == 0 {
                return Err(TlsError::Config(format!(
                    "no trusted CA certificate ({}); set ssl_ca_certs or CA_CERTS_PATH",
                    self.trust()
                )));
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            if self.check_hostname {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyHostName { inner: webpki }))
            }
        };
        let config = match self.client_identity()? {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// A Redis client for a `rediss://` URL (ssl parameters already removed)
    /// with these settings.
    pub fn redis_client(&self, url: &str) -> Result<redis::Client, TlsError> {
        use redis::IntoConnectionInfo as _;
        let bad = |e: redis::RedisError| TlsError::Config(format!("{:?}: {e}", e.kind()));
        let client_tls = match &self.certfile {
            Some(certfile) => {
                let keyfile = self.keyfile.as_deref().unwrap_or(certfile);
                // Parsed here too, so a bad file is named before redis-rs sees it.
                self.client_identity()?;
                Some(redis::ClientTlsConfig {
                    client_cert: read_file(certfile, "client certificate")?,
                    client_key: read_file(keyfile, "client key")?,
                })
            }
            None => None,
        };
        let root_cert = if self.verify {
            let roots = self.roots()?;
            if roots.is_empty() {
                return Err(TlsError::Config(format!(
                    "no trusted CA certificate ({}); set ssl_ca_certs or CA_CERTS_PATH",
                    self.trust()
                )));
            }
            Some(to_pem(&roots))
        } else {
            None
        };
        // `#insecure` is redis-rs' spelling of CERT_NONE.
        let url = if self.verify {
            url.to_owned()
        } else {
            format!("{}#insecure", url.split('#').next().unwrap_or(url))
        };
        let client = redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(bad)?;
        if self.verify && !self.check_hostname {
            let info = client.get_connection_info().clone();
            let mut addr = info.addr().clone();
            addr.set_danger_accept_invalid_hostnames(true);
            let info = info.set_addr(addr);
            return redis::Client::open(info.into_connection_info().map_err(bad)?).map_err(bad);
        }
        Ok(client)
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.to_owned(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

fn to_pem(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = String::new();
    for c in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or(""));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// `ssl_cert_reqs=none`: any certificate is accepted (signatures of the
/// handshake itself are still checked).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `ssl_check_hostname=false`: the chain is verified, the name is not.
#[derive(Debug)]
struct AnyHostName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Which TLS check an error (its text, as the drivers report it) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's certificate is not signed by a trusted CA.
    UnknownIssuer,
    /// The certificate does not name the host connected to.
    HostName,
    /// Expired or not yet valid.
    Expired,
    /// Any other refusal of the server's certificate.
    BadCertificate,
    /// The server refused our client certificate (or wanted one).
    ClientCertificateRefused,
    /// The server does not speak TLS on that port.
    NotTls,
}

impl TlsFailure {
    /// Classifies an error text; `None` when it is not a TLS problem (an
    /// outage, a refused connection, a wrong password).
    pub fn classify(text: &str) -> Option<Self> {
        let t = text;
        if t.contains("invalid peer certificate") || t.contains("InvalidCertificate") {
            return Some(
                if t.contains("UnknownIssuer") || t.contains("unknown issuer") {
                    TlsFailure::UnknownIssuer
                } else if t.contains("NotValidForName") || t.contains("not valid for name") {
                    TlsFailure::HostName
                } else if t.contains("Expired") || t.contains("NotValidYet") {
                    TlsFailure::Expired
                } else {
                    TlsFailure::BadCertificate
                },
            );
        }
        if t.contains("received fatal alert")
            && (t.contains("CertificateRequired")
                || t.contains("BadCertificate")
                || t.contains("UnknownCA")
                || t.contains("HandshakeFailure")
                || t.contains("AccessDenied"))
        {
            return Some(TlsFailure::ClientCertificateRefused);
        }
        if t.contains("InvalidContentType")
            || t.contains("invalid content type")
            || t.contains("corrupt message")
            || t.contains("InvalidMessage")
        {
            return Some(TlsFailure::NotTls);
        }
        None
    }

    /// The problem in words, with what to check.
    pub fn describe(self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => {
                "certificate verification failed: the server's certificate is not signed by a \
                 trusted CA (check ssl_ca_certs / CA_CERTS_PATH / --ca-certs)"
            }
            TlsFailure::HostName => {
                "certificate verification failed: the server's certificate is not valid for the \
                 host name in the URL (connect by a name the certificate lists, or \
                 ssl_check_hostname=false)"
            }
            TlsFailure::Expired => {
                "certificate verification failed: the server's certificate is expired or not \
                 yet valid"
            }
            TlsFailure::BadCertificate => {
                "certificate verification failed: the server's certificate was refused"
            }
            TlsFailure::ClientCertificateRefused => {
                "handshake refused by the server, most likely for our client certificate \
                 (check ssl_certfile / ssl_keyfile)"
            }
            TlsFailure::NotTls => "handshake failed: the server does not speak TLS on this port",
        }
    }
}

/// A TLS failure explained in one line naming the service, the endpoint and
/// what was trusted; `None` when `error` is not a TLS problem.
pub fn explain(service: &str, trust: Option<&str>, error: &str) -> Option<String> {
    let failure = TlsFailure::classify(error)?;
    let trust = trust.map(|t| format!("; trusted: {t}")).unwrap_or_default();
    Some(format!(
        "{service}: TLS {}{trust} ({error})",
        failure.describe()
    ))
}

/// A TLS connection that the server closed (reset, end of file) while the
/// protocol's own handshake was starting, explained; `None` for other errors.
/// With TLS 1.3 the client's side of the handshake is done before the server
/// has checked the client certificate, so a server that refuses ours (or
/// wants one) closes the connection afterwards and its alert is often lost to
/// the reset: seen from here, a closed connection. Call only for connections
/// that are TLS.
pub fn explain_closed(service: &str, trust: Option<&str>, error: &str) -> Option<String> {
    let t = error.to_ascii_lowercase();
    let closed = [
        "connection reset",
        "unexpected eof",
        "unexpectedeof",
        "broken pipe",
    ]
    .iter()
    .any(|k| t.contains(k));
    if !closed || TlsFailure::classify(error).is_some() {
        return None;
    }
    let trust = trust.map(|t| format!("; trusted: {t}")).unwrap_or_default();
    Some(format!(
        "{service}: TLS {}{trust} (the server closed the connection right after the TLS \
         handshake: {error})",
        TlsFailure::ClientCertificateRefused.describe()
    ))
}

/// The URL om-worker's own MongoDB client parses: `mongo_url` with
/// omega|ml's `tls=OMEGA_USESSL, tlsCAFile=CA_CERTS_PATH` applied as pymongo
/// applies keyword arguments (over the URL's own). Off, the URL is used as
/// it is (its own `tls=true&tlsCAFile=...` work).
pub fn mongo_client_url(mongo_url: &str, use_ssl: bool, ca: Option<&Path>) -> String {
    if !use_ssl {
        return mongo_url.to_owned();
    }
    let (base, query) = match mongo_url.split_once('?') {
        Some((b, q)) => (b.to_owned(), q),
        None => (mongo_url.to_owned(), ""),
    };
    let overridden = |k: &str| {
        let k = k.to_ascii_lowercase();
        k == "tls" || k == "ssl" || (ca.is_some() && (k == "tlscafile" || k == "ssl_ca_certs"))
    };
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| !overridden(p.split('=').next().unwrap_or("")))
        .map(str::to_owned)
        .collect();
    pairs.push("tls=true".into());
    if let Some(ca) = ca {
        pairs.push(format!(
            "tlsCAFile={}",
            percent_encode(&ca.display().to_string())
        ));
    }
    // A URL without a path needs one before the query (mongodb://h/?tls=true).
    let sep = if base
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'))
    {
        "?"
    } else {
        "/?"
    };
    format!("{base}{sep}{}", pairs.join("&"))
}

/// True when a MongoDB URL asks for TLS (`tls=true`/`ssl=true`, a CA file,
/// or `mongodb+srv://`, where TLS is the default).
pub fn mongo_uses_tls(url: &str) -> bool {
    let url = url.to_ascii_lowercase();
    if url.starts_with("mongodb+srv://") {
        return true;
    }
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .any(|p| matches!(p, "tls=true" | "ssl=true") || p.starts_with("tlscafile="))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_ssl_params_are_split_off() {
        let (url, p) = split_ssl_params(
            "rediss://:pw@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Fca.pem&foo=1",
        )
        .expect("parses");
        assert_eq!(url, "rediss://:pw@h:6380/0?foo=1");
        assert_eq!(p.cert_reqs, Some(CertReqs::Required));
        assert_eq!(p.ca_certs.as_deref(), Some(Path::new("/etc/ca.pem")));
        let (url, p) = split_ssl_params("rediss://h/0?ssl_cert_reqs=CERT_NONE").expect("parses");
        assert_eq!(url, "rediss://h/0");
        assert_eq!(p.cert_reqs, Some(CertReqs::None));
        assert!(!TlsSettings::new(&p, None).expect("ok").verify);
        let (url, p) = split_ssl_params(
            "amqps://u:p@h//?ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=False",
        )
        .expect("parses");
        assert_eq!(url, "amqps://u:p@h//");
        assert_eq!(p.certfile.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(p.keyfile.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(p.check_hostname, Some(false));
        // kombu: anything but "false" is true
        let (_, p) = split_ssl_params("rediss://h?ssl_check_hostname=no").expect("parses");
        assert_eq!(p.check_hostname, Some(true));
        // no query, other params, fragment: unchanged
        for u in [
            "redis://h:6379/0",
            "redis://h/0?a=b",
            "rediss://h/0#insecure",
        ] {
            let (url, p) = split_ssl_params(u).expect("parses");
            assert_eq!((url.as_str(), p.any()), (u, false));
        }
    }

    #[test]
    fn tls_is_used_where_kombu_uses_it() {
        let off = WorkerTls::default();
        let on = WorkerTls {
            use_ssl: true,
            ca_certs: Some("/ca.pem".into()),
        };
        let tls = |url: &str, w: &WorkerTls| {
            let (u, s) = for_url(url, w).expect("ok");
            (u, s.map(|s| s.trust()))
        };
        // plain unless asked
        assert_eq!(tls("amqp://h//", &off), ("amqp://h//".into(), None));
        assert_eq!(tls("redis://h/0", &off), ("redis://h/0".into(), None));
        assert_eq!(
            tls("redis://h/0", &on),
            ("redis://h/0".into(), None),
            "kombu ignores a boolean broker_use_ssl on Redis"
        );
        // OMEGA_USESSL: amqp:// becomes amqps:// (py-amqp ssl=True), CA_CERTS_PATH added to the roots
        assert_eq!(
            tls("amqp://u:p@h//", &on),
            (
                "amqps://u:p@h//".into(),
                Some("system roots + CA file /ca.pem".into())
            )
        );
        assert_eq!(
            tls("pyamqps://h//", &off),
            (
                "amqps://h//".into(),
                Some("system roots (SSL_CERT_FILE/SSL_CERT_DIR)".into())
            )
        );
        // kombu's ssl_* parameters turn TLS on and say what to trust
        assert_eq!(
            tls(
                "redis://h/0?ssl_cert_reqs=required&ssl_ca_certs=/x.pem",
                &on
            ),
            (
                "rediss://h/0".into(),
                Some("CA file /x.pem (ssl_ca_certs)".into())
            )
        );
        assert_eq!(
            tls("rediss://h/0?ssl_cert_reqs=none", &off).1.as_deref(),
            Some("certificate not verified (ssl_cert_reqs=none)")
        );
        // secure by default on a bare rediss:// (kombu: CERT_NONE with a warning)
        assert_eq!(
            tls("rediss://h/0", &off).1.as_deref(),
            Some("system roots (SSL_CERT_FILE/SSL_CERT_DIR)")
        );
        assert!(for_url("unix:///tmp/r.sock?ssl_cert_reqs=none", &off).is_err());
        assert_eq!(tls("rpc://", &on), ("rpc://".into(), None));
    }

    #[test]
    fn bad_ssl_params_are_named() {
        let err = split_ssl_params("rediss://h?ssl_cert_reqs=maybe").expect_err("bad value");
        assert!(err.to_string().contains("ssl_cert_reqs"), "{err}");
        let err = split_ssl_params("rediss://h?ssl_ciphers=x").expect_err("unknown");
        assert!(err.to_string().contains("ssl_ciphers"), "{err}");
        let err = split_ssl_params("rediss://h?ssl_ca_certs=").expect_err("empty");
        assert!(err.to_string().contains("ssl_ca_certs"), "{err}");
        let p = UrlTlsParams {
            keyfile: Some("/k".into()),
            ..Default::default()
        };
        assert!(TlsSettings::new(&p, None).is_err(), "a key without a cert");
    }

    #[test]
    fn cert_reqs_names() {
        for (s, want) in [
            ("required", CertReqs::Required),
            ("CERT_REQUIRED", CertReqs::Required),
            ("optional", CertReqs::Optional),
            ("CERT_OPTIONAL", CertReqs::Optional),
            ("none", CertReqs::None),
            ("CERT_NONE", CertReqs::None),
        ] {
            assert_eq!(s.parse::<CertReqs>(), Ok(want), "{s}");
        }
        assert!("REQUIRED".parse::<CertReqs>().is_err());
        // optional verifies, as it does on a Python client
        let p = UrlTlsParams {
            cert_reqs: Some(CertReqs::Optional),
            ..Default::default()
        };
        assert!(TlsSettings::new(&p, None).expect("ok").verify);
    }

    #[test]
    fn trust_is_described_without_secrets() {
        let s = TlsSettings::new(&UrlTlsParams::default(), Some(Path::new("/ca.pem"))).expect("ok");
        assert_eq!(s.trust(), "system roots + CA file /ca.pem");
        let p = UrlTlsParams {
            ca_certs: Some("/only.pem".into()),
            check_hostname: Some(false),
            ..Default::default()
        };
        let s = TlsSettings::new(&p, Some(Path::new("/ca.pem"))).expect("ok");
        assert_eq!(
            s.trust(),
            "CA file /only.pem (ssl_ca_certs), host name not checked"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let p = UrlTlsParams {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = TlsSettings::new(&p, None)
            .expect("ok")
            .rustls_config()
            .expect_err("no file");
        assert!(
            err.to_string().contains("CA file /nonexistent/ca.pem"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").expect("write");
        let p = UrlTlsParams {
            ca_certs: Some(empty),
            ..Default::default()
        };
        let err = TlsSettings::new(&p, None)
            .expect("ok")
            .redis_client("rediss://127.0.0.1:1/0")
            .expect_err("no cert");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn insecure_configs_build() {
        let p = UrlTlsParams {
            cert_reqs: Some(CertReqs::None),
            ..Default::default()
        };
        let s = TlsSettings::new(&p, None).expect("ok");
        s.rustls_config().expect("rustls config");
        s.redis_client("rediss://127.0.0.1:1/0").expect("client");
    }

    #[test]
    fn a_closed_tls_connection_points_at_the_client_certificate() {
        let line = explain_closed(
            "amqps",
            Some("CA /pki/ca.pem"),
            "IO error: Connection reset by peer (os error 104)",
        )
        .expect("explained");
        assert!(line.contains("client certificate"), "{line}");
        assert!(line.contains("ssl_certfile"), "{line}");
        assert!(line.contains("trusted: CA /pki/ca.pem"), "{line}");
        assert!(line.contains("Connection reset by peer"), "{line}");
        // other errors, and TLS failures explain() already names, are left alone
        assert!(explain_closed("amqps", None, "connection refused").is_none());
        assert!(explain_closed(
            "amqps",
            None,
            "invalid peer certificate: UnknownIssuer; connection reset"
        )
        .is_none());
    }

    #[test]
    fn failures_are_classified() {
        use TlsFailure::*;
        for (text, want) in [
            (
                "IO error: invalid peer certificate: UnknownIssuer",
                Some(UnknownIssuer),
            ),
            (
                "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
                 certificate is only valid for DnsName(\"other\")",
                Some(HostName),
            ),
            ("invalid peer certificate: NotValidForName", Some(HostName)),
            ("invalid peer certificate: Expired", Some(Expired)),
            (
                "invalid peer certificate: BadSignature",
                Some(BadCertificate),
            ),
            (
                "received fatal alert: CertificateRequired",
                Some(ClientCertificateRefused),
            ),
            (
                "received corrupt message of type InvalidContentType",
                Some(NotTls),
            ),
            ("Connection refused (os error 111)", None),
            ("ACCESS_REFUSED - Login was refused", None),
        ] {
            assert_eq!(TlsFailure::classify(text), want, "{text}");
        }
        let line = explain(
            "broker amqps://u:***@127.0.0.1:5671//",
            Some("CA file /x/ca.pem (ssl_ca_certs)"),
            "invalid peer certificate: UnknownIssuer",
        )
        .expect("a TLS failure");
        assert!(line.contains("certificate verification failed"), "{line}");
        assert!(line.contains("not signed by a trusted CA"), "{line}");
        assert!(line.contains("/x/ca.pem"), "{line}");
        assert!(explain("broker", None, "Connection refused").is_none());
    }

    #[test]
    fn mongo_url_gets_omegamls_tls_kwargs() {
        let ca = Path::new("/etc/my ca.pem");
        assert_eq!(
            mongo_client_url("mongodb://u:p@h:27017/omega", false, Some(ca)),
            "mongodb://u:p@h:27017/omega",
            "OMEGA_USESSL off: the URL as it is"
        );
        assert_eq!(
            mongo_client_url("mongodb://u:p@h:27017/omega", true, None),
            "mongodb://u:p@h:27017/omega?tls=true"
        );
        assert_eq!(
            mongo_client_url(
                "mongodb://u:p@h:27017/omega?authSource=admin&tls=false&tlsCAFile=/old.pem",
                true,
                Some(ca)
            ),
            "mongodb://u:p@h:27017/omega?authSource=admin&tls=true&tlsCAFile=/etc/my%20ca.pem"
        );
        assert_eq!(
            mongo_client_url("mongodb://h:27017", true, None),
            "mongodb://h:27017/?tls=true"
        );
        assert!(mongo_uses_tls(
            "mongodb://h/omega?authSource=admin&TLS=true"
        ));
        assert!(mongo_uses_tls("mongodb+srv://cluster.example/omega"));
        assert!(!mongo_uses_tls("mongodb://h/omega?authSource=admin"));
        assert!(!mongo_uses_tls("mongodb://h/omega?tls=false"));
    }
}
