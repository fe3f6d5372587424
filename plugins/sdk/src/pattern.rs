//! gitignore-syntax patterns, matched against a file's whole relative path.
//!
//! The syntax is git's: `#` comments, `!` re-includes, a trailing `/` matches
//! directories only, a pattern with a `/` at its start or middle is anchored to
//! the model's root while one without matches at any depth, `*` and `?` and
//! `[a-z]` never cross a `/`, `**/` matches any number of directories and `/**`
//! everything inside. The last matching pattern decides.
//!
//! One deliberate difference: models are file lists, not directory walks, so
//! every file is judged on its own path. A file under an excluded directory can
//! therefore be re-included (`weights/` then `!weights/config.json`), which git
//! does not allow.
//!
//! Why not `globset`: it builds for wasm32-wasip2, but it matches globs, not
//! gitignore rules (anchoring, `!`, trailing `/`, last match wins), so this
//! module's rule layer would stay and only the per-part glob matcher would
//! go; and it brings `regex-automata`, `aho-corasick` and `bstr` into every
//! plugin built on the SDK: the exclude-patterns component grew from 168 KB
//! to 939 KB in the `plugin` profile when it linked globset. The host parses
//! requests' patterns with this module too (`ExcludeOptions::validate`), so
//! what it refuses and what the reference plugin accepts cannot drift.

use std::fmt;

/// An ordered list of patterns.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// One parsed pattern.
#[derive(Clone, Debug)]
pub struct Rule {
    text: String,
    negated: bool,
    dir_only: bool,
    segments: Vec<Segment>,
}

/// What the rules say about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No rule matched.
    Unmatched,
    /// The deciding rule excludes the path; it carries the rule's text.
    Excluded(&'a str),
    /// The deciding rule (a `!` rule) includes the path again.
    Included(&'a str),
}

/// A pattern that cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternError {
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pattern `{}`: {}", self.pattern, self.reason)
    }
}

impl std::error::Error for PatternError {}

impl Rules {
    /// Parses patterns in order; blank lines and `#` comments are skipped.
    ///
    /// # Errors
    /// The first pattern that cannot be parsed (an unclosed `[`, a lone `\`).
    ///
    /// ```
    /// use modelcache_policy::pattern::{Rules, Verdict};
    /// let rules = Rules::parse(["*.md", "!README.md", "docs/"]).unwrap();
    /// assert_eq!(rules.verdict("guide/intro.md"), Verdict::Excluded("*.md"));
    /// assert_eq!(rules.verdict("README.md"), Verdict::Included("!README.md"));
    /// assert_eq!(rules.verdict("docs/a/b.txt"), Verdict::Excluded("docs/"));
    /// assert_eq!(rules.verdict("src/docs"), Verdict::Unmatched);
    /// ```
    pub fn parse<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Rules, PatternError> {
        let mut rules = Vec::new();
        for pattern in patterns {
            if let Some(rule) = Rule::parse(pattern)? {
                rules.push(rule);
            }
        }
        Ok(Rules { rules })
    }

    /// Adds the rules of `other` after these (they win over these).
    pub fn extend(&mut self, other: Rules) {
        self.rules.extend(other.rules);
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Judges a `/`-separated relative path: the last rule that matches it, or
    /// one of its parent directories, decides.
    pub fn verdict(&self, path: &str) -> Verdict<'_> {
        if self.rules.is_empty() {
            return Verdict::Unmatched;
        }
        // Paths are rarely deeper than this; deeper ones take the heap.
        let mut stack = [""; 32];
        let mut heap = Vec::new();
        let mut count = 0;
        for part in path.split('/').filter(|part| !part.is_empty()) {
            if count < stack.len() {
                stack[count] = part;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack);
                }
                heap.push(part);
            }
            count += 1;
        }
        let parts: &[&str] = if heap.is_empty() { &stack[..count] } else { &heap };
        for rule in self.rules.iter().rev() {
            if rule.matches(parts) {
                return if rule.negated { Verdict::Included(&rule.text) } else { Verdict::Excluded(&rule.text) };
            }
        }
        Verdict::Unmatched
    }

    /// The pattern that excludes `path`, if the rules exclude it.
    pub fn excluded_by(&self, path: &str) -> Option<&str> {
        match self.verdict(path) {
            Verdict::Excluded(pattern) => Some(pattern),
            Verdict::Unmatched | Verdict::Included(_) => None,
        }
    }
}

impl Rule {
    fn parse(line: &str) -> Result<Option<Rule>, PatternError> {
        let error = |reason| PatternError { pattern: line.to_owned(), reason };
        let mut body = trim_unescaped_trailing_spaces(line);
        if body.is_empty() || body.starts_with('#') {
            return Ok(None);
        }
        let negated = body.starts_with('!');
        // A leading `!` negates; `\!` and `\#` stand for a literal first `!` or `#`.
        if negated || body.starts_with("\\!") || body.starts_with("\\#") {
            body = &body[1..];
        }
        let dir_only = body.ends_with('/') && !body.ends_with("\\/");
        let body = body.trim_end_matches('/');
        if body.is_empty() {
            return Err(error("matches nothing"));
        }
        // A `/` at the start or in the middle anchors the pattern to the root;
        // otherwise it may match at any depth, as if it began with `**/`.
        let anchored = body.contains('/');
        let body = body.trim_start_matches('/');
        let mut segments = Vec::new();
        if !anchored {
            segments.push(Segment::AnyDirs);
        }
        let raw: Vec<&str> = body.split('/').filter(|part| !part.is_empty()).collect();
        for (index, part) in raw.iter().enumerate() {
            if *part == "**" {
                let last = index == raw.len() - 1;
                // `dir/**` matches what is inside `dir`, not `dir` itself.
                segments.push(if last { Segment::SomeDirs } else { Segment::AnyDirs });
            } else {
                segments.push(Segment::Glob(Glob::parse(part).map_err(error)?));
            }
        }
        Ok(Some(Rule { text: line.trim().to_owned(), negated, dir_only, segments }))
    }

    /// Whether the rule matches the path or one of its parent directories.
    fn matches(&self, parts: &[&str]) -> bool {
        let Some((last, parents_parts)) = parts.split_last() else { return false };
        // The common unanchored pattern (`*.md`, `cache`): any name matches.
        if let [Segment::AnyDirs, Segment::Glob(glob)] = self.segments.as_slice() {
            return parents_parts.iter().any(|part| glob.matches(part)) || (!self.dir_only && glob.matches(last));
        }
        let parents = parts.len().saturating_sub(1);
        (1..=parents).any(|depth| match_segments(&self.segments, &parts[..depth]))
            || (!self.dir_only && match_segments(&self.segments, parts))
    }
}

fn trim_unescaped_trailing_spaces(line: &str) -> &str {
    let mut end = line.len();
    while end > 0 && line.as_bytes()[end - 1] == b' ' {
        if end >= 2 && line.as_bytes()[end - 2] == b'\\' {
            break;
        }
        end -= 1;
    }
    &line[..end]
}

#[derive(Clone, Debug)]
enum Segment {
    /// `**` in the middle or at the start: zero or more directories.
    AnyDirs,
    /// `**` at the end: one or more path parts.
    SomeDirs,
    /// One path part.
    Glob(Glob),
}

/// Matches pattern segments against path parts. `**` is a star over parts,
/// so the classic single-backtrack wildcard algorithm applies.
fn match_segments(segments: &[Segment], parts: &[&str]) -> bool {
    let (mut s, mut p) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while p < parts.len() || s < segments.len() {
        match segments.get(s) {
            Some(Segment::AnyDirs) => {
                backtrack = Some((s, p));
                s += 1;
                continue;
            }
            Some(Segment::SomeDirs) if p < parts.len() => {
                // Needs at least one part; the rest it may swallow later.
                backtrack = Some((s, p + 1));
                s += 1;
                p += 1;
                continue;
            }
            Some(Segment::Glob(glob)) if p < parts.len() && glob.matches(parts[p]) => {
                s += 1;
                p += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((star, start)) if start < parts.len() => {
                backtrack = Some((star, start + 1));
                s = star + 1;
                p = start + 1;
            }
            _ => return false,
        }
    }
    true
}

/// A glob over one path part: literals, `?`, `*` and `[…]` classes. Common
/// shapes (`name`, `*.ext`, `prefix*`, `*`) skip the general matcher.
#[derive(Clone, Debug)]
enum Glob {
    Exact(String),
    Suffix(String),
    Prefix(String),
    Anything,
    Tokens(Vec<Token>),
}

#[derive(Clone, Debug)]
enum Token {
    Literal(char),
    AnyChar,
    Star,
    Class { negated: bool, ranges: Vec<(char, char)> },
}

impl Glob {
    fn parse(text: &str) -> Result<Glob, &'static str> {
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let token = match c {
                '\\' => Token::Literal(chars.next().ok_or("ends with a lone `\\`")?),
                '?' => Token::AnyChar,
                '*' => {
                    // Stars that are not a whole `**` part are plain stars.
                    while chars.peek() == Some(&'*') {
                        chars.next();
                    }
                    Token::Star
                }
                '[' => {
                    let negated = matches!(chars.peek(), Some('!' | '^'));
                    if negated {
                        chars.next();
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    loop {
                        let c = chars.next().ok_or("has an unclosed `[`")?;
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        let low = if c == '\\' { chars.next().ok_or("has an unclosed `[`")? } else { c };
                        let mut high = low;
                        if chars.peek() == Some(&'-') {
                            chars.next();
                            match chars.next() {
                                Some(']') => {
                                    ranges.push((low, low));
                                    ranges.push(('-', '-'));
                                    break;
                                }
                                Some(end) => high = end,
                                None => return Err("has an unclosed `[`"),
                            }
                        }
                        ranges.push((low, high));
                    }
                    Token::Class { negated, ranges }
                }
                c => Token::Literal(c),
            };
            tokens.push(token);
        }
        Ok(Glob::shape(tokens))
    }

    fn shape(tokens: Vec<Token>) -> Glob {
        let literal = |tokens: &[Token]| -> Option<String> {
            tokens
                .iter()
                .map(|token| match token {
                    Token::Literal(c) => Some(*c),
                    _ => None,
                })
                .collect()
        };
        match tokens.as_slice() {
            [Token::Star] => Glob::Anything,
            [Token::Star, rest @ ..] if literal(rest).is_some() => Glob::Suffix(literal(rest).unwrap_or_default()),
            [rest @ .., Token::Star] if literal(rest).is_some() => Glob::Prefix(literal(rest).unwrap_or_default()),
            all if literal(all).is_some() => Glob::Exact(literal(all).unwrap_or_default()),
            _ => Glob::Tokens(tokens),
        }
    }

    fn matches(&self, text: &str) -> bool {
        match self {
            Glob::Exact(literal) => text == literal,
            Glob::Suffix(suffix) => text.ends_with(suffix.as_str()),
            Glob::Prefix(prefix) => text.starts_with(prefix.as_str()),
            Glob::Anything => true,
            Glob::Tokens(tokens) => match_tokens(tokens, text),
        }
    }
}

/// Classic wildcard matching with one backtrack point for the last `*`.
fn match_tokens(tokens: &[Token], text: &str) -> bool {
    let (mut t, mut i) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while i < text.len() || t < tokens.len() {
        if let Some(token) = tokens.get(t) {
            if let Token::Star = token {
                backtrack = Some((t, i));
                t += 1;
                continue;
            }
            if let Some(c) = text[i..].chars().next() {
                let hit = match token {
                    Token::Literal(expected) => *expected == c,
                    Token::AnyChar => true,
                    Token::Class { negated, ranges } => ranges.iter().any(|&(low, high)| low <= c && c <= high) != *negated,
                    Token::Star => unreachable!("handled above"),
                };
                if hit {
                    t += 1;
                    i += c.len_utf8();
                    continue;
                }
            }
        }
        match backtrack {
            Some((star, start)) if start < text.len() => {
                let width = text[start..].chars().next().map_or(1, char::len_utf8);
                backtrack = Some((star, start + width));
                t = star + 1;
                i = start + width;
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(patterns: &[&str], path: &str) -> bool {
        Rules::parse(patterns.iter().copied()).unwrap().excluded_by(path).is_some()
    }

    /// A pattern without a slash matches a file or directory name at any depth.
    #[test]
    fn unanchored_patterns_match_at_any_depth() {
        assert!(excluded(&["*.bin"], "model.bin"));
        assert!(excluded(&["*.bin"], "a/b/model.bin"));
        assert!(!excluded(&["*.bin"], "a/model.bin.txt"));
        assert!(excluded(&["cache"], "x/cache/y.txt"));
        assert!(excluded(&["cache"], "cache"));
    }

    /// A slash anchors the pattern to the root: whole paths, not base names.
    #[test]
    fn anchored_patterns_match_whole_paths() {
        assert!(excluded(&["docs/*.md"], "docs/a.md"));
        assert!(!excluded(&["docs/*.md"], "x/docs/a.md"));
        assert!(!excluded(&["docs/*.md"], "docs/sub/a.md"));
        assert!(excluded(&["/top.txt"], "top.txt"));
        assert!(!excluded(&["/top.txt"], "sub/top.txt"));
    }

    /// A trailing slash matches directories only: the files under them.
    #[test]
    fn directory_patterns_match_what_is_inside() {
        assert!(excluded(&["onnx/"], "onnx/model.onnx"));
        assert!(excluded(&["onnx/"], "a/onnx/b/model.onnx"));
        assert!(!excluded(&["onnx/"], "onnx"));
        assert!(excluded(&["a/b/"], "a/b/c"));
        assert!(!excluded(&["a/b/"], "x/a/b/c"));
    }

    /// `**` spans any number of directories and `/**` everything inside.
    #[test]
    fn double_stars_span_directories() {
        assert!(excluded(&["**/*.pt"], "x.pt"));
        assert!(excluded(&["**/*.pt"], "a/b/c/x.pt"));
        assert!(excluded(&["a/**/z"], "a/z"));
        assert!(excluded(&["a/**/z"], "a/b/c/z"));
        assert!(!excluded(&["a/**/z"], "b/a/z"));
        assert!(excluded(&["ckpt/**"], "ckpt/1/w.bin"));
        assert!(!excluded(&["ckpt/**"], "ckpt"));
        assert!(excluded(&["a**b"], "axyb"));
        assert!(!excluded(&["a**b"], "ax/yb"));
    }

    /// The last matching pattern wins, so `!` re-includes and order matters.
    #[test]
    fn last_match_wins() {
        assert!(!excluded(&["*.json", "!config.json"], "config.json"));
        assert!(excluded(&["*.json", "!config.json"], "tokenizer.json"));
        assert!(excluded(&["!config.json", "*.json"], "config.json"));
        // Per-file judgement: a file under an excluded directory comes back.
        assert!(!excluded(&["weights/", "!weights/config.json"], "weights/config.json"));
    }

    /// `?`, classes and escapes behave as in git, also on non-ASCII names.
    #[test]
    fn wildcards_classes_and_escapes() {
        assert!(excluded(&["model-0000?.bin"], "model-00001.bin"));
        assert!(!excluded(&["model-0000?.bin"], "model-000012.bin"));
        assert!(excluded(&["[a-c]*.txt"], "beta.txt"));
        assert!(!excluded(&["[!a-c]*.txt"], "beta.txt"));
        assert!(excluded(&["\\#notes"], "#notes"));
        assert!(excluded(&["\\!bang"], "!bang"));
        assert!(excluded(&["?del"], "ödel"));
        assert!(!excluded(&["?del"], "oödel"));
        assert!(excluded(&["*ö*"], "schön.txt"));
        assert!(excluded(&["*.txt  "], "a.txt"));
    }

    /// Comments and blank lines are skipped; broken patterns are named.
    #[test]
    fn comments_blanks_and_errors() {
        let rules = Rules::parse(["# weights", "", "   "]).unwrap();
        assert!(rules.is_empty());
        let error = Rules::parse(["ok", "[abc"]).unwrap_err();
        assert_eq!(error.pattern, "[abc");
        assert!(error.to_string().contains("unclosed"));
        assert!(Rules::parse(["/"]).is_err());
    }

    /// Star backtracking stays correct on patterns with several stars.
    #[test]
    fn several_stars_backtrack() {
        assert!(excluded(&["*a*b*c"], "xxaxxbxxc"));
        assert!(!excluded(&["*a*b*c"], "xxaxxcxxb"));
        assert!(excluded(&["**/x/**/y"], "p/x/q/r/y"));
        assert!(!excluded(&["**/x/**/y"], "p/x/q/r/z"));
    }
}
