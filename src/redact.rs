//! Connection strings without their secrets, for logs and errors. Works on text that
//! does not parse as a URL too (a typo such as `redis//:secret@host` is exactly when a
//! URL gets printed), so it never relies on a parser.

/// `url` with its password replaced by `***`: whatever follows the first `:` of the
/// user info (from `//`, or from the start when there is none, to the last `@`), and
/// the value of every `password=` parameter (URL query or `key=value` form).
pub fn redact(url: &str) -> String {
    let mut out = match url.rfind('@') {
        Some(at) => {
            let start = url[..at].find("//").map_or(0, |s| s + 2);
            match url[start..at].find(':') {
                Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    };
    let mut from = 0;
    while let Some(found) = find_password_param(&out[from..]) {
        let value_start = from + found;
        let value_end = out[value_start..]
            .find(['&', ' ', '\t', '\n', '#'])
            .map_or(out.len(), |e| value_start + e);
        out.replace_range(value_start..value_end, "***");
        from = value_start + 3;
    }
    out
}

/// Where the value of the next `password=` (any case) starts, when the name begins a
/// parameter (at the start, or after `?`, `&` or whitespace).
fn find_password_param(s: &str) -> Option<usize> {
    const NAME: &str = "password=";
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(NAME) {
        let at = from + i;
        let starts_parameter =
            at == 0 || matches!(lower.as_bytes()[at - 1], b'?' | b'&' | b' ' | b'\t' | b'\n');
        if starts_parameter {
            return Some(at + NAME.len());
        }
        from = at + NAME.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden_in_urls() {
        assert_eq!(
            redact("redis://:pw@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("redis://user:pw@host"), "redis://user:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(
            redact("postgres://wal2cache@db/app"),
            "postgres://wal2cache@db/app"
        );
        assert_eq!(
            redact("postgres://u:p:w@rd@db/app"),
            "postgres://u:***@db/app",
            "up to the last @"
        );
    }

    #[test]
    fn passwords_are_hidden_in_what_does_not_parse() {
        assert_eq!(redact("redis//:secret@host/0"), "redis//:***@host/0");
        assert_eq!(redact("redis:secret@host"), "redis:***@host");
        assert_eq!(redact("redis:/u:secret@host"), "redis:***@host");
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret&sslmode=disable"),
            "postgres://h/db?user=u&password=***&sslmode=disable"
        );
        assert_eq!(
            redact("host=h PassWord=secret dbname=app"),
            "host=h PassWord=*** dbname=app"
        );
        assert_eq!(redact("password=a password=b"), "password=*** password=***");
        assert_eq!(redact("old_password=x"), "old_password=x");
        for secret in ["redis//:secret@host/0", "x password=secret", "a:secret@b@c"] {
            assert!(!redact(secret).contains("secret"), "{secret}");
        }
    }
}
