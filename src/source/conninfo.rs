//! libpq's connection options that tokio-postgres does not take (`sslrootcert`,
//! `sslcert`, `sslkey`, and `sslmode`'s `verify-ca` / `verify-full`), taken out of
//! `postgres.url` before the rest is handed to tokio-postgres. Both of libpq's forms
//! are read: the URL (`postgres://…?sslmode=verify-full&sslrootcert=ca.pem`) and the
//! keyword/value string (`host=db sslmode=verify-full sslrootcert=ca.pem`).

/// The connection string without the options asked for, and those options' values
/// in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub rest: String,
    pub options: Vec<(String, String)>,
}

/// Takes every option whose key is in `keys` out of `conninfo`.
pub fn extract(conninfo: &str, keys: &[&str]) -> Result<Extracted, String> {
    let trimmed = conninfo.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        extract_url(conninfo, keys)
    } else {
        extract_keywords(conninfo, keys)
    }
}

fn extract_url(url: &str, keys: &[&str]) -> Result<Extracted, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(Extracted {
            rest: url.to_string(),
            options: Vec::new(),
        });
    };
    let mut kept = Vec::new();
    let mut options = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        if keys.contains(&key.as_str()) {
            options.push((key, percent_decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Extracted { rest, options })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        "a % in a parameter must be followed by two hex digits".to_string()
                    })?;
                out.push(hex);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not UTF-8 once decoded".to_string())
}

/// A keyword as it may appear in an error: never the text around it, which may hold
/// a password.
fn shown(key: &str) -> String {
    if !key.is_empty()
        && key.len() <= 32
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        format!("{key:?}")
    } else {
        "a keyword".to_string()
    }
}

/// `key = value` pairs separated by spaces; a value may be single-quoted, and a
/// backslash escapes the next character (libpq's rules).
fn extract_keywords(conninfo: &str, keys: &[&str]) -> Result<Extracted, String> {
    let chars: Vec<(usize, char)> = conninfo.char_indices().collect();
    let mut i = 0;
    let mut kept: Vec<&str> = Vec::new();
    let mut options = Vec::new();
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].1.is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= chars.len() {
            break;
        }
        let start = chars[i].0;
        let mut key = String::new();
        while i < chars.len() && chars[i].1 != '=' && !chars[i].1.is_whitespace() {
            key.push(chars[i].1);
            i += 1;
        }
        skip_space(&mut i);
        if i >= chars.len() || chars[i].1 != '=' {
            return Err(format!(
                "missing \"=\" after {}: write postgres://user@host/database, or keyword=value pairs",
                shown(&key)
            ));
        }
        i += 1;
        skip_space(&mut i);
        let mut value = String::new();
        if i < chars.len() && chars[i].1 == '\'' {
            i += 1;
            loop {
                match chars.get(i).map(|c| c.1) {
                    None => {
                        return Err(format!("unterminated quoted value of {}", shown(&key)));
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        if let Some(&(_, c)) = chars.get(i + 1) {
                            value.push(c);
                        }
                        i += 2;
                    }
                    Some(c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].1.is_whitespace() {
                if chars[i].1 == '\\' {
                    if let Some(&(_, c)) = chars.get(i + 1) {
                        value.push(c);
                    }
                    i += 2;
                } else {
                    value.push(chars[i].1);
                    i += 1;
                }
            }
        }
        let end = chars.get(i).map_or(conninfo.len(), |c| c.0);
        if keys.contains(&key.as_str()) {
            options.push((key, value));
        } else {
            kept.push(&conninfo[start..end]);
        }
    }
    Ok(Extracted {
        rest: kept.join(" "),
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSL: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

    fn opts(e: &Extracted) -> Vec<(&str, &str)> {
        e.options
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn takes_the_options_out_of_a_url_and_keeps_the_rest() {
        let e = extract(
            "postgres://u:p@db:5432/shop?sslmode=verify-full&connect_timeout=3&sslrootcert=%2Fetc%2Fca%20x.pem",
            SSL,
        )
        .unwrap();
        assert_eq!(e.rest, "postgres://u:p@db:5432/shop?connect_timeout=3");
        assert_eq!(
            opts(&e),
            [("sslmode", "verify-full"), ("sslrootcert", "/etc/ca x.pem")]
        );
        let e = extract("postgresql://u@db/shop?sslcert=c.pem&sslkey=k.pem", SSL).unwrap();
        assert_eq!(e.rest, "postgresql://u@db/shop");
        assert_eq!(opts(&e), [("sslcert", "c.pem"), ("sslkey", "k.pem")]);
        let e = extract("postgres://u@db/shop", SSL).unwrap();
        assert_eq!(e.rest, "postgres://u@db/shop");
        assert!(e.options.is_empty());
        assert!(extract("postgres://u@db/shop?sslrootcert=%zz", SSL)
            .unwrap_err()
            .contains("two hex digits"));
    }

    #[test]
    fn takes_the_options_out_of_a_keyword_string() {
        let e = extract(
            "host=db  user=app sslmode = verify-ca sslrootcert='/etc/my ca\\'s.pem' password=a\\ b dbname=shop",
            SSL,
        )
        .unwrap();
        assert_eq!(e.rest, "host=db user=app password=a\\ b dbname=shop");
        assert_eq!(
            opts(&e),
            [
                ("sslmode", "verify-ca"),
                ("sslrootcert", "/etc/my ca's.pem")
            ]
        );
        assert!(extract("host=db sslrootcert='open", SSL)
            .unwrap_err()
            .contains("unterminated"));
        assert!(extract("host db", SSL)
            .unwrap_err()
            .contains("missing \"=\""));
        let err = extract("postgres//u:secret@h/db", SSL).unwrap_err();
        assert!(
            err.contains("a keyword") && !err.contains("secret"),
            "{err}"
        );
    }
}
