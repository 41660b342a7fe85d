//! A table's name as the rules file writes it and as SQL needs it: `schema.table`,
//! where either part may be a double-quoted identifier (`public."dot.ted"`) holding
//! dots, quotes or anything else. Unquoted parts are taken as they are written (no case
//! folding): `public.Products` names the table `Products`.

use std::fmt;

use postgres_protocol::escape::escape_identifier;

/// `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// Schemas whose tables are PostgreSQL's own: never published, never cached by rules.
pub const SYSTEM_SCHEMAS: &[&str] = &["pg_catalog", "information_schema", "pg_toast"];

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table`; each part may be `"quoted"` (with `""` for a quote).
    pub fn parse(text: &str) -> Result<TableName, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        loop {
            let (part, after) = identifier(rest)?;
            parts.push(part);
            match after.strip_prefix('.') {
                Some(next) => rest = next,
                None if after.is_empty() => break,
                None => return Err(format!("unexpected {after:?} after an identifier")),
            }
        }
        match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Ok(TableName { schema, name }),
            Err(parts) if parts.len() == 1 => Err(format!(
                "is not schema-qualified: write it as schema.table, e.g. public.{}",
                TableName::new("public", parts[0].clone()).name_part()
            )),
            Err(_) => Err(
                "has more than one unquoted dot: a name that contains a dot is written in double quotes, e.g. public.\"dot.ted\""
                    .to_string(),
            ),
        }
    }

    /// Quoted for SQL: `"public"."products"`.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            escape_identifier(&self.schema),
            escape_identifier(&self.name)
        )
    }

    /// A table of PostgreSQL's own catalogs.
    pub fn is_system(&self) -> bool {
        SYSTEM_SCHEMAS.contains(&self.schema.as_str()) || self.schema.starts_with("pg_temp")
    }

    fn name_part(&self) -> String {
        rules_form(&self.name)
    }
}

/// One identifier at the start of `text` and what follows it.
fn identifier(text: &str) -> Result<(String, &str), String> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                out.push(c);
                continue;
            }
            if quoted[i + 1..].starts_with('"') {
                chars.next();
                out.push('"');
                continue;
            }
            if out.is_empty() {
                return Err("has an empty quoted identifier \"\"".into());
            }
            return Ok((out, &quoted[i + 1..]));
        }
        return Err("has a '\"' without its closing '\"'".into());
    }
    let end = text.find(['.', '"']).unwrap_or(text.len());
    if end == 0 {
        return Err("has an empty part: write it as \"schema.table\"".into());
    }
    if text[end..].starts_with('"') {
        return Err(
            "has a '\"' inside an unquoted name: quote the whole part, e.g. public.\"my\"\"table\""
                .into(),
        );
    }
    Ok((text[..end].to_string(), &text[end..]))
}

/// An identifier as the rules file writes it: quoted only when it must be.
fn rules_form(part: &str) -> String {
    if part.is_empty() || part.contains(['.', '"']) {
        format!("\"{}\"", part.replace('"', "\"\""))
    } else {
        part.to_string()
    }
}

impl fmt::Display for TableName {
    /// `schema.table` as the rules file writes it (quoted parts only where needed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", rules_form(&self.schema), rules_form(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_quoted_names() {
        assert_eq!(
            TableName::parse("public.products").unwrap(),
            TableName::new("public", "products")
        );
        assert_eq!(
            TableName::parse("public.\"dot.ted\"").unwrap(),
            TableName::new("public", "dot.ted")
        );
        assert_eq!(
            TableName::parse("\"My Schema\".\"say \"\"hi\"\"\"").unwrap(),
            TableName::new("My Schema", "say \"hi\"")
        );
        assert_eq!(
            TableName::parse("public.Products").unwrap().name,
            "Products",
            "no case folding"
        );
    }

    #[test]
    fn refuses_what_is_ambiguous_or_broken() {
        for (text, needle) in [
            ("products", "not schema-qualified"),
            ("dot.ted.x", "more than one unquoted dot"),
            ("public.", "empty part"),
            (".t", "empty part"),
            ("public.\"open", "without its closing"),
            ("public.\"\"", "empty quoted identifier"),
            ("public.a\"b", "inside an unquoted name"),
            ("public.\"a\"b", "after an identifier"),
        ] {
            let err = TableName::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err = TableName::parse("\"dot.ted\"").unwrap_err();
        assert!(err.ends_with("e.g. public.\"dot.ted\""), "{err}");
    }

    #[test]
    fn displays_as_written_and_quotes_for_sql() {
        let t = TableName::new("public", "dot.ted");
        assert_eq!(t.to_string(), "public.\"dot.ted\"");
        assert_eq!(TableName::parse(&t.to_string()).unwrap(), t);
        assert_eq!(t.quoted(), "\"public\".\"dot.ted\"");
        assert_eq!(
            TableName::new("Odd\"Schema", "t").quoted(),
            "\"Odd\"\"Schema\".\"t\""
        );
        assert!(TableName::new("pg_catalog", "pg_class").is_system());
        assert!(!TableName::new("public", "pg_class").is_system());
    }
}
