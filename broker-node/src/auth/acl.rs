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
//! With an ACL file, everything not granted is denied, and a `deny` rule wins over
//! every grant of the topics it matches. As in Mosquitto, a subscription is refused
//! only when its filter can match nothing the client may read; a subscription that may
//! also match unreadable topics (a `deny` inside it, or grants that cover only part of
//! it) is granted as [`SubscribeAccess::Filtered`], and the messages it matches are
//! checked one by one at delivery ([`Acl::may_read`]), so that a dashboard on `fleet/#`
//! gets the fleet without `fleet/secret/#`. Subscriptions wholly inside a grant and
//! clear of every deny need no check at delivery.

use std::borrow::Cow;
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

/// What the rules say about a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeAccess {
    /// Nothing it matches may be read: refused.
    Denied,
    /// Everything it matches may be read.
    Granted,
    /// Some of what it matches may be read: granted, and each message is checked at
    /// delivery.
    Filtered,
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

    /// Whether the client may receive a message published to `topic`.
    pub fn may_read(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.decide(username, client_id, |rule, filter| {
            (matches!(rule.access, Access::Read | Access::ReadWrite | Access::Deny))
                .then(|| topic_matches(filter, topic))
                .unwrap_or(false)
        })
    }

    /// Whether the client may subscribe to `filter` (a shared subscription's filter
    /// without its `$share/group/` prefix), and whether its messages need a check.
    pub fn subscribe_access(
        &self,
        username: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> SubscribeAccess {
        let (grants, denies) = self.read_rules(username, client_id);
        // Some topic the filter matches is readable: it is inside a grant and no deny
        // takes the whole of that part.
        let readable = grants.iter().any(|grant| {
            intersection(grant, filter)
                .is_some_and(|part| !denies.iter().any(|deny| covers(deny, &part)))
        });
        if !readable {
            return SubscribeAccess::Denied;
        }
        let whole = grants.iter().any(|grant| covers(grant, filter))
            && !denies.iter().any(|deny| overlaps(deny, filter));
        if whole {
            SubscribeAccess::Granted
        } else {
            SubscribeAccess::Filtered
        }
    }

    /// Whether the client may subscribe to `filter` at all.
    pub fn may_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.subscribe_access(username, client_id, filter) != SubscribeAccess::Denied
    }

    /// The filters of the read grants and of the denies that apply to this client, with
    /// `%c` and `%u` filled in.
    fn read_rules<'a>(
        &'a self,
        username: Option<&'a str>,
        client_id: &'a str,
    ) -> (Vec<Cow<'a, str>>, Vec<Cow<'a, str>>) {
        let mut grants = Vec::new();
        let mut denies = Vec::new();
        for (rule, filter) in self.rules_for(username, client_id) {
            match rule.access {
                Access::Read | Access::ReadWrite => grants.push(filter),
                Access::Deny => denies.push(filter),
                Access::Write => {}
            }
        }
        (grants, denies)
    }

    /// The rules that apply to this client, each with its filter as it applies.
    fn rules_for<'a>(
        &'a self,
        username: Option<&'a str>,
        client_id: &'a str,
    ) -> impl Iterator<Item = (&'a Rule, Cow<'a, str>)> + 'a {
        let own: &[Rule] = match username {
            None => &self.anonymous,
            Some(u) => self
                .users
                .iter()
                .find(|(name, _)| name == u)
                .map(|(_, rules)| rules.as_slice())
                .unwrap_or(&[]),
        };
        own.iter().chain(&self.patterns).filter_map(move |rule| {
            if !rule.pattern {
                // Borrowed: a check per delivery or publish allocates nothing for it.
                return Some((rule, Cow::Borrowed(rule.filter.as_str())));
            }
            // A pattern naming the username does not apply to anonymous clients.
            if username.is_none() && rule.filter.contains("%u") {
                return None;
            }
            let filter = rule
                .filter
                .replace("%c", client_id)
                .replace("%u", username.unwrap_or(""));
            Some((rule, Cow::Owned(filter)))
        })
    }

    /// Apply every rule for this client: granted when some grant applies and no deny.
    fn decide(
        &self,
        username: Option<&str>,
        client_id: &str,
        applies: impl Fn(&Rule, &str) -> bool,
    ) -> bool {
        let mut granted = false;
        for (rule, filter) in self.rules_for(username, client_id) {
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

/// The filter matching exactly the topics that both `a` and `b` match, if any.
fn intersection(a: &str, b: &str) -> Option<String> {
    let mut x = a.split('/');
    let mut y = b.split('/');
    let mut out: Vec<&str> = Vec::new();
    loop {
        match (x.next(), y.next()) {
            // `#` also matches the parent level: what is left of the other filter
            // (possibly nothing) completes the intersection.
            (Some("#"), rest) => {
                out.extend(rest.into_iter().chain(y.by_ref()));
                break;
            }
            (rest, Some("#")) => {
                out.extend(rest.into_iter().chain(x.by_ref()));
                break;
            }
            (Some("+"), Some(level)) | (Some(level), Some("+")) => out.push(level),
            (Some(p), Some(q)) if p == q => out.push(p),
            (None, None) => break,
            _ => return None,
        }
    }
    // A filter's first-level wildcard never matches `$` topics.
    let dollar = |f: &str| f.starts_with('$');
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild_first(b)) || (dollar(b) && wild_first(a)) {
        return None;
    }
    Some(out.join("/"))
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
        // Both could match fleet/secret/pose: granted, and checked per message.
        assert_eq!(
            acl.subscribe_access(d, "dash-1", "fleet/+/pose"),
            SubscribeAccess::Filtered
        );
        assert_eq!(
            acl.subscribe_access(d, "dash-1", "fleet/#"),
            SubscribeAccess::Filtered
        );
        assert_eq!(
            acl.subscribe_access(d, "dash-1", "fleet/r7/#"),
            SubscribeAccess::Granted
        );
        assert!(acl.may_read(d, "dash-1", "fleet/r7/pose"));
        assert!(!acl.may_read(d, "dash-1", "fleet/secret/pose"));
        // Wholly inside the deny: refused.
        assert!(!acl.may_subscribe(d, "dash-1", "fleet/secret/key"));
        assert!(!acl.may_subscribe(d, "dash-1", "fleet/secret/#"));
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
    fn a_deny_inside_a_wildcard_grant_withholds_only_its_topics_as_mosquitto_does() {
        // The issue's example: `topic deny secret/x` then `topic readwrite #`.
        let acl = Acl::parse("topic deny secret/x\ntopic readwrite #\n").expect("parses");
        for filter in ["#", "secret/+", "secret/#", "+/x"] {
            assert_eq!(
                acl.subscribe_access(None, "c", filter),
                SubscribeAccess::Filtered,
                "{filter}"
            );
        }
        assert_eq!(
            acl.subscribe_access(None, "c", "secret/x"),
            SubscribeAccess::Denied
        );
        assert_eq!(
            acl.subscribe_access(None, "c", "public/#"),
            SubscribeAccess::Granted
        );
        assert!(!acl.may_read(None, "c", "secret/x"));
        assert!(acl.may_read(None, "c", "secret/y"));
    }

    #[test]
    fn a_filter_partly_outside_every_grant_is_filtered_and_one_wholly_outside_refused() {
        let acl = Acl::parse("topic read a/b\ntopic read c/#\n").expect("parses");
        assert_eq!(
            acl.subscribe_access(None, "c", "a/+"),
            SubscribeAccess::Filtered
        );
        assert_eq!(
            acl.subscribe_access(None, "c", "#"),
            SubscribeAccess::Filtered
        );
        assert_eq!(
            acl.subscribe_access(None, "c", "x/#"),
            SubscribeAccess::Denied
        );
        assert!(acl.may_read(None, "c", "a/b"));
        assert!(!acl.may_read(None, "c", "a/c"));
        // A grant denied as a whole leaves nothing to read.
        let acl = Acl::parse("topic read a/b\ntopic deny a/#\n").expect("parses");
        assert_eq!(
            acl.subscribe_access(None, "c", "a/+"),
            SubscribeAccess::Denied
        );
    }

    #[test]
    fn intersections_of_filters() {
        assert_eq!(intersection("a/#", "+/b").as_deref(), Some("a/b"));
        assert_eq!(intersection("a/#", "a").as_deref(), Some("a"));
        assert_eq!(intersection("#", "x/+/y").as_deref(), Some("x/+/y"));
        assert_eq!(intersection("a/+", "a/b/c"), None);
        assert_eq!(intersection("a/+/#", "+/b/c").as_deref(), Some("a/b/c"));
        assert_eq!(intersection("#", "$SYS/x"), None);
        assert_eq!(intersection("$SYS/#", "$SYS/x").as_deref(), Some("$SYS/x"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        assert_eq!(Acl::parse("user a\ntopic read a/#/b\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("allow all\n").unwrap_err().0, 1);
    }
}
