//! Broker URL → lapin's [`AMQPUri`], by kombu's rules rather than lapin's.
//!
//! Celery users write URLs for kombu, and the same string must mean the same
//! vhost and credentials to the Python clients and to us, so this follows
//! kombu's `url_to_parts` (guest/guest by default, an empty path or `//`
//! means vhost `/`, the `pyamqp`/`pyamqps` schemes) instead of lapin's own
//! URI parser. Errors never echo the password (the URL is masked).

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

use super::AmqpOptions;
use crate::broker::BrokerError;
use crate::redact::mask_url;

/// Parses an AMQP URL the way kombu does (`kombu/utils/url.py:url_to_parts`).
pub(super) fn parse_url(url: &str, options: &AmqpOptions) -> Result<AMQPUri, BrokerError> {
    let bad = |why: &str| BrokerError::InvalidUrl(format!("{} ({why})", mask_url(url)));
    let parsed = ::url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let (scheme, default_port) = match parsed.scheme() {
        "amqp" | "pyamqp" => (AMQPScheme::AMQP, 5672),
        "amqps" | "pyamqps" => (AMQPScheme::AMQPS, 5671),
        other => return Err(bad(&format!("unsupported scheme {other:?}"))),
    };
    let decode = |s: &str| percent_decode(s).ok_or_else(|| bad("invalid percent-encoding"));
    let host = parsed.host_str().unwrap_or("localhost");
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let username = match parsed.username() {
        "" => "guest".to_owned(),
        u => decode(u)?,
    };
    let password = match parsed.password() {
        None => "guest".to_owned(),
        Some(p) => decode(p)?,
    };
    // kombu: strip one leading '/', unquote, empty means the default vhost '/'.
    let path = parsed.path();
    let path = path.strip_prefix('/').unwrap_or(path);
    let vhost = decode(path)?;
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        vhost
    };
    Ok(AMQPUri {
        scheme,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo { username, password },
            host,
            port: parsed.port().unwrap_or(default_port),
        },
        vhost,
        query: AMQPQueryString {
            heartbeat: options.heartbeat,
            connection_timeout: u64::try_from(options.connect_timeout.as_millis()).ok(),
            ..AMQPQueryString::default()
        },
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_url_rules() {
        let o = AmqpOptions::default();
        let u = parse_url("amqp://guest:guest@127.0.0.1:5672//", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.port, 5672);
        let u = parse_url("amqp://u:p%40ss@h", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.userinfo.password, "p@ss");
        let u = parse_url("amqp://h/", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.authority.userinfo.username, "guest");
        let u = parse_url("amqps://h/prod", &o).expect("url");
        assert_eq!(u.vhost, "prod");
        assert_eq!(u.scheme, AMQPScheme::AMQPS);
        assert_eq!(u.authority.port, 5671);
        let u = parse_url("amqp://h/%2f", &o).expect("url");
        assert_eq!(u.vhost, "/");
        assert!(parse_url("redis://h", &o).is_err());
        let err = parse_url("http://u:secret@h", &o).expect_err("bad scheme");
        assert!(!err.to_string().contains("secret"));
    }
}
