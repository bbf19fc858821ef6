//! Mosquitto-compatible ACL files.
//!
//! ```text
//! # anonymous clients (lines before any `user`)
//! topic read public/#
//! user dashboard
//! topic read fleet/#
//! topic write fleet/+/command
//! # every client: %c is its client id, %u its username
//! pattern readwrite devices/%c/#
//! topic deny fleet/secret/#
//! ```
//!
//! With an ACL file, everything not granted is denied. A `deny` rule wins over any
//! grant that overlaps it. A subscription is granted when a read rule covers its whole
//! filter (every topic the filter matches is readable), so deliveries need no check of
//! their own.

use std::path::Path;

use crate::mqtt::topic::topic_matches;

/// What a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Clone, Debug)]
struct Rule {
    access: Access,
    /// A topic filter, possibly with `%c` / `%u` (patterns only).
    filter: String,
    pattern: bool,
}

/// A loaded ACL file.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// Rules for clients without a username.
    anonymous: Vec<Rule>,
    /// Rules per username.
    users: Vec<(String, Vec<Rule>)>,
    /// `pattern` rules, for every client.
    patterns: Vec<Rule>,
}

/// Why an ACL file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("ACL file {path}, line {line}: {reason}")]
pub struct AclError {
    /// The file.
    pub path: String,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl Acl {
    /// Read and parse `path`.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|e| AclError {
            path: path.display().to_string(),
            line: 0,
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|(line, reason)| AclError {
            path: path.display().to_string(),
            line,
            reason,
        })
    }

    /// Parse the text of an ACL file; the error names the line.
    pub fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut current_user: Option<usize> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err((i + 1, "user needs a name".to_owned()));
                    }
                    acl.users.push((rest.to_owned(), Vec::new()));
                    current_user = Some(acl.users.len() - 1);
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest, keyword == "pattern").map_err(|e| (i + 1, e))?;
                    if rule.pattern {
                        acl.patterns.push(rule);
                    } else {
                        match current_user {
                            Some(u) => acl.users[u].1.push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    return Err((
                        i + 1,
                        format!("unknown keyword {other:?} (user, topic or pattern)"),
                    ))
                }
            }
        }
        Ok(acl)
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.decide(username, client_id, |rule, filter| {
            (matches!(
                rule.access,
                Access::Write | Access::ReadWrite | Access::Deny
            ))
            .then(|| topic_matches(filter, topic))
            .unwrap_or(false)
        })
    }

    /// Whether the client may subscribe to `filter` (a shared subscription's filter
    /// without its `$share/group/` prefix).
    pub fn may_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.decide(username, client_id, |rule, acl_filter| match rule.access {
            Access::Read | Access::ReadWrite => covers(acl_filter, filter),
            Access::Deny => overlaps(acl_filter, filter),
            Access::Write => false,
        })
    }

    /// Apply every rule for this client: granted when some grant applies and no deny.
    fn decide(
        &self,
        username: Option<&str>,
        client_id: &str,
        applies: impl Fn(&Rule, &str) -> bool,
    ) -> bool {
        let own: &[Rule] = match username {
            None => &self.anonymous,
            Some(u) => self
                .users
                .iter()
                .find(|(name, _)| name == u)
                .map(|(_, rules)| rules.as_slice())
                .unwrap_or(&[]),
        };
        let mut granted = false;
        for rule in own.iter().chain(&self.patterns) {
            let filter = if rule.pattern {
                // A pattern naming the username does not apply to anonymous clients.
                if username.is_none() && rule.filter.contains("%u") {
                    continue;
                }
                rule.filter
                    .replace("%c", client_id)
                    .replace("%u", username.unwrap_or(""))
            } else {
                rule.filter.clone()
            };
            if applies(rule, &filter) {
                if rule.access == Access::Deny {
                    return false;
                }
                granted = true;
            }
        }
        granted
    }
}

fn parse_rule(rest: &str, pattern: bool) -> Result<Rule, String> {
    let (access, filter) = match rest.split_once(char::is_whitespace) {
        Some((word @ ("read" | "write" | "readwrite" | "deny"), filter)) => (word, filter.trim()),
        _ => ("readwrite", rest),
    };
    if filter.is_empty() {
        return Err("a topic is missing".to_owned());
    }
    let access = match access {
        "read" => Access::Read,
        "write" => Access::Write,
        "deny" => Access::Deny,
        _ => Access::ReadWrite,
    };
    crate::mqtt::topic::validate_topic_filter(filter)
        .map_err(|e| format!("invalid topic filter {filter:?}: {e}"))?;
    Ok(Rule {
        access,
        filter: filter.to_owned(),
        pattern,
    })
}

/// Whether every topic `filter` matches is also matched by `acl`.
fn covers(acl: &str, filter: &str) -> bool {
    let mut a = acl.split('/');
    let mut f = filter.split('/');
    loop {
        match (a.next(), f.next()) {
            (Some("#"), _) => return !filter.starts_with('$') || !acl.starts_with('#'),
            (Some("+"), Some(level)) => {
                if level == "#" {
                    return false;
                }
            }
            (Some(x), Some(y)) if x == y && y != "+" && y != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic could match both `acl` and `filter`.
fn overlaps(acl: &str, filter: &str) -> bool {
    let mut a = acl.split('/');
    let mut f = filter.split('/');
    loop {
        match (a.next(), f.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#
user dashboard
topic read fleet/#
topic write fleet/+/command
topic deny fleet/secret/#
pattern readwrite devices/%c/#
pattern read users/%u/inbox
";

    #[test]
    fn grants_follow_the_user_the_patterns_and_deny() {
        let acl = Acl::parse(FILE).expect("parses");
        // Anonymous: only public reads, and its own device tree.
        assert!(acl.may_subscribe(None, "c1", "public/news"));
        assert!(!acl.may_publish(None, "c1", "public/news"));
        assert!(acl.may_publish(None, "c1", "devices/c1/state"));
        assert!(!acl.may_publish(None, "c1", "devices/c2/state"));
        assert!(!acl.may_subscribe(None, "c1", "users//inbox"));
        // dashboard: reads the fleet but not the secret part, commands robots.
        let d = Some("dashboard");
        assert!(acl.may_subscribe(d, "dash-1", "fleet/r7/#"));
        // Both could match fleet/secret/pose: the deny wins.
        assert!(!acl.may_subscribe(d, "dash-1", "fleet/+/pose"));
        assert!(!acl.may_subscribe(d, "dash-1", "fleet/#"));
        assert!(!acl.may_subscribe(d, "dash-1", "fleet/secret/key"));
        assert!(acl.may_publish(d, "dash-1", "fleet/r7/command"));
        assert!(!acl.may_publish(d, "dash-1", "fleet/r7/pose"));
        assert!(acl.may_subscribe(d, "dash-1", "users/dashboard/inbox"));
        // A user with no section gets only the patterns.
        assert!(!acl.may_subscribe(Some("other"), "o", "fleet/x"));
        assert!(acl.may_publish(Some("other"), "o", "devices/o/x"));
    }

    #[test]
    fn coverage_is_judged_on_whole_filters() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "a/b"));
        assert!(!covers("#", "$SYS/x"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        assert_eq!(Acl::parse("user a\ntopic read a/#/b\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("allow all\n").unwrap_err().0, 1);
    }
}
