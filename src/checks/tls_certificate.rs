//! `tls.certificate`: seconds until a certificate in a PEM file expires (lower is worse).
//!
//! `path` names a PEM file (the database's `server.crt`, the control plane's CA, a bundle).
//! The certificates are its `CERTIFICATE` blocks (other blocks, such as a private key in
//! a combined file, are skipped); a file without any PEM block is tried as one DER
//! certificate. By default only the first certificate, the leaf, is judged; with
//! `chain = true` every certificate is, and the one that expires first wins (an
//! intermediate that runs out breaks the chain as surely as the leaf).
//!
//! - The value is the seconds from now until `notAfter`, negative once expired;
//!   thresholds are durations where less is worse (defaults 14d / 3d: two weeks to
//!   renew, and a certificate that will not see the next weekend out is an emergency).
//! - Expired, or not valid yet (`notBefore` in the future), is critical whatever the
//!   thresholds: clients refuse it now.
//! - A file that holds no valid certificate (garbage, a cut PEM, only a key) is critical:
//!   a service configured with it cannot start TLS.
//! - A file that cannot be read (missing, permission) is `unknown`: nothing was measured.
//!
//! The message names the certificate's subject, when it expires (RFC 3339, UTC) and,
//! with a chain, which certificate it is. Metrics: `vigil_tls_certificate_expiry_timestamp_seconds`
//! (the judged `notAfter`, Unix seconds, as blackbox_exporter's
//! `probe_ssl_earliest_cert_expiry`, so alerts can compute time left themselves) and
//! `vigil_tls_certificate_certificates` (certificates read).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration as StdDuration, UNIX_EPOCH};

use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::checks::backup::unix_now;
use crate::checks::postgres::format_secs;
use crate::checks::{Check, CheckContext, CheckError, Common, KindConfig, Metric, Observation};
use crate::checks::{Status, Thresholds};
use crate::config::types::Duration;

/// Warning default: 14 days left.
pub const DEFAULT_WARN_SECS: f64 = 14.0 * 86_400.0;
/// Critical default: 3 days left.
pub const DEFAULT_CRIT_SECS: f64 = 3.0 * 86_400.0;
/// Most bytes read of the file: the system's whole CA bundle is about 200 KiB; anything
/// far larger is not a certificate file, and must not be read into memory whole.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most PEM blocks looked at.
const MAX_BLOCKS: usize = 1000;

crate::check_config! {
    /// `[check.tls.certificate.NAME]`: time left on a PEM file's certificate(s).
    pub struct TlsCertificateConfig: Duration {
        /// The PEM file.
        pub path: PathBuf,
        /// Judge every certificate of the file, not only the first (default false).
        #[serde(default)]
        pub chain: Option<bool>,
    }
}

impl TlsCertificateConfig {
    /// `path` must be absolute after resolution (always, since the loader resolves it); a
    /// missing file is not a config error: it is `unknown` at run time, as a certificate
    /// may be deployed after the agent's config.
    pub fn validate(&self, _enabled: bool) -> Vec<(&'static str, String)> {
        if self.path.as_os_str().is_empty() {
            vec![("path", "must name a PEM file".to_string())]
        } else {
            Vec::new()
        }
    }
}

/// A running `tls.certificate` check.
pub struct TlsCertificateCheck {
    path: PathBuf,
    chain: bool,
    thresholds: Thresholds,
}

impl TlsCertificateCheck {
    /// Builds the check, applying the defaults.
    pub fn from_config(c: &TlsCertificateConfig, _common: &Common) -> Self {
        let (warn, crit) = KindConfig::thresholds_or(c, DEFAULT_WARN_SECS, DEFAULT_CRIT_SECS);
        TlsCertificateCheck {
            path: c.path.clone(),
            chain: c.chain.unwrap_or(false),
            thresholds: Thresholds::lower(warn, crit),
        }
    }
}

impl Check for TlsCertificateCheck {
    async fn run(&mut self, _cx: &CheckContext) -> Result<Observation, CheckError> {
        let path = self.path.clone();
        // A small file, but possibly on a slow or hung mount: off the async threads.
        let bytes = tokio::task::spawn_blocking(move || read_bounded(&path))
            .await
            .map_err(|e| CheckError::Internal(format!("reading the certificate: {e}")))??;
        Ok(evaluate(
            &bytes,
            &self.path,
            self.chain,
            &self.thresholds,
            unix_now(),
        ))
    }
}

/// Reads at most [`MAX_FILE_BYTES`] of `path`.
fn read_bounded(path: &Path) -> Result<Vec<u8>, CheckError> {
    let ctx = || format!("reading {}", path.display());
    let f = std::fs::File::open(path).map_err(|e| CheckError::io(ctx(), e))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CheckError::io(ctx(), e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(CheckError::Parse(format!(
            "{} is larger than {} MiB: not a certificate file",
            path.display(),
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// What one certificate says about its validity.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFacts {
    /// Its subject, as `CN=db1.example.com, O=Example` (RFC 4514 order as printed by
    /// x509-parser).
    pub subject: String,
    /// `notBefore`, Unix seconds.
    pub not_before: i64,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// The certificates of a PEM (or DER) file, in file order: each parsed, or why not.
pub fn read_certificates(bytes: &[u8]) -> Vec<Result<CertFacts, String>> {
    let mut out = Vec::new();
    let mut saw_pem = false;
    for block in Pem::iter_from_buffer(bytes).take(MAX_BLOCKS) {
        saw_pem = true;
        match block {
            Ok(pem) if is_certificate_label(&pem.label) => {
                out.push(facts_of_der(&pem.contents));
            }
            // A key or parameters beside the certificate.
            Ok(_) => {}
            Err(e) => out.push(Err(format!("bad PEM block: {e}"))),
        }
    }
    if !saw_pem && !bytes.is_empty() {
        out.push(facts_of_der(bytes).map_err(|e| format!("not PEM, and as DER: {e}")));
    }
    out
}

/// `CERTIFICATE`, and the older `X509 CERTIFICATE` and OpenSSL's `TRUSTED CERTIFICATE`
/// (whose DER starts with the certificate).
fn is_certificate_label(label: &str) -> bool {
    matches!(
        label,
        "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE"
    )
}

fn facts_of_der(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a certificate: {e}"))?;
    let v = cert.validity();
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// Judges the file's certificates at `now` (Unix seconds).
pub fn evaluate(bytes: &[u8], path: &Path, chain: bool, t: &Thresholds, now: f64) -> Observation {
    let certs = read_certificates(bytes);
    let total = certs.len();
    let judged: Vec<(usize, &Result<CertFacts, String>)> = if chain {
        certs.iter().enumerate().collect()
    } else {
        certs.iter().enumerate().take(1).collect()
    };
    let count = Metric::gauge(
        "vigil_tls_certificate_certificates",
        "Certificates found in the file",
        total as f64,
    );
    let invalid = |msg: String| Observation {
        status: Status::Critical,
        value: None,
        message: msg,
        metrics: vec![count.clone()],
        replication: None,
    };
    if judged.is_empty() {
        return invalid(format!("{} holds no certificate", path.display()));
    }
    if let Some((i, Err(e))) = judged.iter().find(|(_, c)| c.is_err()) {
        return invalid(format!(
            "{}: {} is not a valid certificate: {e}",
            path.display(),
            which(*i, total)
        ));
    }
    // Every judged entry is Ok here (errors returned above); the `else` cannot happen.
    let Some((i, c)) = judged
        .iter()
        .filter_map(|(i, c)| c.as_ref().ok().map(|c| (*i, c)))
        .min_by_key(|(_, c)| c.not_after)
    else {
        return invalid(format!("{} holds no certificate", path.display()));
    };
    let left = c.not_after as f64 - now;
    let not_yet = judged
        .iter()
        .filter_map(|(i, c)| c.as_ref().ok().map(|c| (*i, c)))
        .find(|(_, c)| c.not_before as f64 > now);
    let who = if chain && total > 1 {
        format!("{} ({})", c.subject, which(i, total))
    } else {
        c.subject.clone()
    };
    let (status, message) = if left < 0.0 {
        (
            Status::Critical,
            format!(
                "{who} expired {} ago ({})",
                format_secs(-left),
                rfc3339(c.not_after)
            ),
        )
    } else if let Some((j, n)) = not_yet {
        (
            Status::Critical,
            format!(
                "{} is not valid before {} ({} from now)",
                if chain && total > 1 {
                    format!("{} ({})", n.subject, which(j, total))
                } else {
                    n.subject.clone()
                },
                rfc3339(n.not_before),
                format_secs(n.not_before as f64 - now)
            ),
        )
    } else {
        (
            t.classify(left),
            format!(
                "{who} expires in {} ({})",
                format_secs(left),
                rfc3339(c.not_after)
            ),
        )
    };
    Observation {
        status,
        value: Some(left),
        message,
        metrics: vec![
            Metric::gauge(
                "vigil_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the judged certificate (the earliest with chain = true), Unix seconds",
                c.not_after as f64,
            ),
            count,
        ],
        replication: None,
    }
}

/// "certificate 2 of 3".
fn which(i: usize, total: usize) -> String {
    format!("certificate {} of {total}", i + 1)
}

/// Unix seconds as RFC 3339 UTC; out-of-range times are shown as the number.
fn rfc3339(secs: i64) -> String {
    let t = match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH.checked_add(StdDuration::from_secs(s)),
        Err(_) => UNIX_EPOCH.checked_sub(StdDuration::from_secs(secs.unsigned_abs())),
    };
    // humantime formats years 0-9999 only; certificates may say 9999-12-31 at most.
    match t {
        Some(t) if (0..253_402_300_800).contains(&secs) => {
            humantime::format_rfc3339_seconds(t).to_string()
        }
        _ => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, date_time_ymd};

    /// 2030-01-01T00:00:00Z.
    const NOW: f64 = 1_893_456_000.0;

    fn params(cn: &str, from: (i32, u8, u8), to: (i32, u8, u8)) -> CertificateParams {
        let mut p = CertificateParams::new(vec![format!("{cn}.test")]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.not_before = date_time_ymd(from.0, from.1, from.2);
        p.not_after = date_time_ymd(to.0, to.1, to.2);
        p
    }

    fn self_signed(cn: &str, from: (i32, u8, u8), to: (i32, u8, u8)) -> String {
        let key = KeyPair::generate().unwrap();
        params(cn, from, to).self_signed(&key).unwrap().pem()
    }

    fn default_t() -> Thresholds {
        Thresholds::lower(Some(DEFAULT_WARN_SECS), Some(DEFAULT_CRIT_SECS))
    }

    fn eval(pem: &str, chain: bool) -> Observation {
        evaluate(
            pem.as_bytes(),
            Path::new("/x.pem"),
            chain,
            &default_t(),
            NOW,
        )
    }

    #[test]
    fn time_left_is_classified_lower_is_worse() {
        let o = eval(&self_signed("db1", (2029, 1, 1), (2030, 4, 1)), false);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.value, Some(90.0 * 86_400.0));
        assert_eq!(o.message, "CN=db1 expires in 90d 0h (2030-04-01T00:00:00Z)");
        assert_eq!(o.metrics[0].value, 1_901_232_000.0);
        let o = eval(&self_signed("db1", (2029, 1, 1), (2030, 1, 10)), false);
        assert_eq!(o.status, Status::Warning);
        let o = eval(&self_signed("db1", (2029, 1, 1), (2030, 1, 2)), false);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.value, Some(86_400.0));
    }

    #[test]
    fn expired_and_not_yet_valid_are_critical_whatever_the_thresholds() {
        let none = Thresholds::lower(None, None);
        let pem = self_signed("old", (2028, 1, 1), (2029, 12, 31));
        let o = evaluate(pem.as_bytes(), Path::new("/x.pem"), false, &none, NOW);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.value, Some(-86_400.0));
        assert!(
            o.message.starts_with("CN=old expired 1d 0h ago"),
            "{}",
            o.message
        );
        let pem = self_signed("future", (2030, 2, 1), (2031, 1, 1));
        let o = evaluate(pem.as_bytes(), Path::new("/x.pem"), false, &none, NOW);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.contains("is not valid before 2030-02-01"),
            "{}",
            o.message
        );
    }

    #[test]
    fn garbage_and_empty_files_are_critical_without_a_value() {
        for (bytes, says) in [
            (
                &b"hello, I am not a certificate\n"[..],
                "not a valid certificate",
            ),
            (b"", "holds no certificate"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "certificate 1 of 1 is not a valid certificate",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\nMIIB\n",
                "not a valid certificate",
            ),
            (
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "holds no certificate",
            ),
        ] {
            let o = evaluate(bytes, Path::new("/x.pem"), false, &default_t(), NOW);
            assert_eq!((o.status, o.value), (Status::Critical, None), "{says}");
            assert!(o.message.contains(says), "{} !~ {says}", o.message);
        }
    }

    #[test]
    fn the_leaf_alone_or_the_earliest_of_the_chain() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = params("Test CA", (2029, 1, 1), (2030, 1, 5));
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params("db1", (2029, 6, 1), (2030, 6, 1))
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let bundle = format!("{}{}", leaf.pem(), ca.pem());
        let o = eval(&bundle, false);
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.starts_with("CN=db1 expires"), "{}", o.message);
        let o = eval(&bundle, true);
        assert_eq!(o.status, Status::Warning);
        assert_eq!(o.value, Some(4.0 * 86_400.0));
        assert!(
            o.message
                .starts_with("CN=Test CA (certificate 2 of 2) expires in 4d"),
            "{}",
            o.message
        );
        assert_eq!(o.metrics[1].value, 2.0);
        // A key in the same file is skipped; garbage after the leaf fails only a chain.
        let with_key = format!("{}{}", leaf_key.serialize_pem(), leaf.pem());
        assert_eq!(eval(&with_key, true).status, Status::Ok);
        let broken = format!(
            "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            leaf.pem()
        );
        assert_eq!(eval(&broken, false).status, Status::Ok);
        let o = eval(&broken, true);
        assert_eq!((o.status, o.value), (Status::Critical, None));
        assert!(o.message.contains("certificate 2 of 2"), "{}", o.message);
    }

    #[test]
    fn der_is_accepted() {
        let key = KeyPair::generate().unwrap();
        let cert = params("der", (2029, 1, 1), (2030, 4, 1))
            .self_signed(&key)
            .unwrap();
        let o = evaluate(cert.der(), Path::new("/x.der"), false, &default_t(), NOW);
        assert_eq!(o.status, Status::Ok, "{}", o.message);
    }

    #[test]
    fn thresholds_default_and_config_parses() {
        let c: TlsCertificateConfig = toml::from_str(
            "path = \"/etc/ssl/x.pem\"\nwarn = \"30d\"\ncrit = \"2h\"\nchain = true",
        )
        .unwrap();
        let chk = TlsCertificateCheck::from_config(&c, &Common::default());
        assert_eq!(chk.thresholds.warn, Some(30.0 * 86_400.0));
        assert_eq!(chk.thresholds.crit, Some(7_200.0));
        assert!(chk.chain);
        let c: TlsCertificateConfig = toml::from_str("path = \"/x\"").unwrap();
        let chk = TlsCertificateCheck::from_config(&c, &Common::default());
        assert_eq!(
            (chk.thresholds.warn, chk.thresholds.crit, chk.chain),
            (Some(DEFAULT_WARN_SECS), Some(DEFAULT_CRIT_SECS), false)
        );
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_a_status() {
        let e = read_bounded(Path::new("/nonexistent/vigil/x.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vigil/x.pem"), "{e}");
    }
}
