//! Key and tag templates: `shop:product:v3:{id}`. `{column}` is replaced by the
//! column's value in Postgres text form; `{{` and `}}` are literal braces. A template
//! is parsed once, when the rules are compiled, and bound to column positions once
//! per table shape.

use std::fmt;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Column(String),
}

/// Why a template does not parse; `at` is a byte offset into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub at: usize,
    pub problem: &'static str,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.at)
    }
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError {
                at: 0,
                problem: "empty template",
            });
        }
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(TemplateError {
                        at: i,
                        problem: "'}' without a matching '{' (write '}}' for a literal brace)",
                    })
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((j, '{')) => {
                                return Err(TemplateError {
                                    at: j,
                                    problem:
                                        "'{' inside a placeholder (write '{{' for a literal brace)",
                                })
                            }
                            Some((_, c)) => name.push(c),
                            None => {
                                return Err(TemplateError {
                                    at: i,
                                    problem:
                                        "'{' without a closing '}' (write '{{' for a literal brace)",
                                })
                            }
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(TemplateError {
                            at: i,
                            problem: "empty placeholder '{}': name a column inside the braces",
                        });
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Column(name.to_string()));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template {
            source: text.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The columns the template reads, in order of appearance (repeats kept).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Column(c) => Some(c.as_str()),
            Segment::Literal(_) => None,
        })
    }

    pub fn has_placeholders(&self) -> bool {
        self.columns().next().is_some()
    }

    /// The literal text before the first placeholder: every key the template can
    /// produce starts with it.
    pub fn literal_prefix(&self) -> &str {
        match self.segments.first() {
            Some(Segment::Literal(l)) => l,
            _ => "",
        }
    }

    /// The template's text when it has no placeholder.
    pub fn literal(&self) -> Option<&str> {
        match self.segments.as_slice() {
            [Segment::Literal(l)] => Some(l),
            _ => None,
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(t: &str) -> Vec<Segment> {
        Template::parse(t).unwrap().segments
    }

    #[test]
    fn placeholders_and_literals() {
        use Segment::*;
        assert_eq!(
            segs("shop:product:v3:{id}"),
            [Literal("shop:product:v3:".into()), Column("id".into())]
        );
        assert_eq!(
            segs("{tenant}:{id}"),
            [
                Column("tenant".into()),
                Literal(":".into()),
                Column("id".into())
            ]
        );
        assert_eq!(segs("a{{b}}c"), [Literal("a{b}c".into())]);
        assert_eq!(
            segs("{{{id}}}"),
            [
                Literal("{".into()),
                Column("id".into()),
                Literal("}".into())
            ]
        );
    }

    #[test]
    fn prefixes() {
        let t = Template::parse("shop:product:v3:{id}:x").unwrap();
        assert_eq!(t.literal_prefix(), "shop:product:v3:");
        assert_eq!(Template::parse("{id}").unwrap().literal_prefix(), "");
        assert_eq!(
            Template::parse("shop:all").unwrap().literal(),
            Some("shop:all")
        );
    }

    #[test]
    fn malformed_templates_say_what_and_where() {
        for (text, needle) in [
            ("", "empty template"),
            ("a{id", "without a closing"),
            ("a}b", "without a matching"),
            ("a{}", "empty placeholder"),
            ("a{ }", "empty placeholder"),
            ("a{b{c}}", "inside a placeholder"),
        ] {
            let err = Template::parse(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
    }
}
