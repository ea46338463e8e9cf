//! The secrets policy: what of a connection URL may appear in a log line or
//! in `om-worker config`.
//!
//! One function for every URL the worker prints (broker, result backend,
//! MongoDB): the password is replaced by `***`, everything else stays so an
//! operator can still see which server is meant. A string that does not
//! parse as a URL is never echoed if it may carry credentials.

/// `url` with its password replaced by `***`.
///
/// - parseable URL with a password: the password masked (`amqp://u:***@h//`);
/// - parseable URL without one: unchanged (`rpc://`, `redis://h:6379/0`);
/// - not parseable but shaped like `scheme://user:pw@rest`: the password
///   masked by position (between the first `:` after `//` and the last `@`);
/// - anything else not parseable: `<unparseable URL>`, since it cannot be
///   told what part of it is secret.
pub fn mask_url(url: &str) -> String {
    mask_url_as(url, "***")
}

/// [`mask_url`] with another mask: Celery's `conf` and bug report show
/// `********` (kombu `Connection.as_uri(mask='********')`).
pub fn mask_url_as(url: &str, mask: &str) -> String {
    if let Ok(mut u) = url::Url::parse(url) {
        if u.password().is_some() && u.set_password(Some(mask)).is_ok() {
            return u.to_string();
        }
        return url.to_owned();
    }
    if let (Some(s), Some(at)) = (url.find("://"), url.rfind('@')) {
        if at > s + 3 {
            let creds = &url[s + 3..at];
            return match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:{mask}{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            };
        }
    }
    if url.contains(':') || url.contains('@') {
        "<unparseable URL>".to_owned()
    } else {
        url.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("amqp://guest:s3cret@127.0.0.1:5672//"),
            "amqp://guest:***@127.0.0.1:5672//"
        );
        assert_eq!(
            mask_url("mongodb://admin:foo@localhost:27017/omega"),
            "mongodb://admin:***@localhost:27017/omega"
        );
        assert_eq!(mask_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        assert_eq!(mask_url("rpc://"), "rpc://");
        assert_eq!(mask_url("redis://localhost/0"), "redis://localhost/0");
        assert_eq!(mask_url("default"), "default");
    }

    #[test]
    fn unparseable_strings_do_not_leak() {
        assert!(!mask_url("::secret::").contains("secret"));
        let m = mask_url("amqp://user:p@ss w0rd@host:5672//");
        assert!(!m.contains("p@ss") && !m.contains("w0rd"), "{m}");
    }
}
