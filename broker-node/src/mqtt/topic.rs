//! Topic names and topic filters (section 4.7): validation, shared-subscription
//! syntax and matching, with the rule that `#` and `+` at the first level do not match
//! topics beginning with `$`.

/// Why a topic name or filter is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic name or filter [MQTT-4.7.3-1].
    #[error("topic is empty")]
    Empty,
    /// A wildcard in a topic name [MQTT-4.7.0-1].
    #[error("wildcard in a topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("misplaced wildcard")]
    MisplacedWildcard,
    /// `$share/{group}/{filter}` with an empty or invalid group or filter.
    #[error("invalid shared subscription")]
    InvalidShared,
    /// U+0000 in a topic.
    #[error("topic contains U+0000")]
    Nul,
    /// Longer than 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
}

/// Validate a topic name (what a PUBLISH is sent to).
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Split `$share/{group}/{filter}` into (group, filter); `None` if not shared syntax.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

fn validate_plain_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Validate a topic filter, including the shared-subscription form.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if filter == "$share" || filter.starts_with("$share/") {
        let (group, inner) = parse_shared(filter).ok_or(TopicError::InvalidShared)?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::InvalidShared);
        }
        return validate_plain_filter(inner).map_err(|_| TopicError::InvalidShared);
    }
    validate_plain_filter(filter)
}

/// Whether `filter` matches the topic name `topic` [MQTT-4.7].
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_4_7_filters_are_validated_by_wildcard_placement() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "$share/g/a/#",
            "$share/g/#",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", TopicError::Empty),
            ("a/#/b", TopicError::MisplacedWildcard),
            ("a#", TopicError::MisplacedWildcard),
            ("a/b+", TopicError::MisplacedWildcard),
            ("$share/g", TopicError::InvalidShared),
            ("$share//a", TopicError::InvalidShared),
            ("$share/g+/a", TopicError::InvalidShared),
            ("$share/g/", TopicError::InvalidShared),
            ("$share/g/a/#/b", TopicError::InvalidShared),
        ] {
            assert_eq!(validate_topic_filter(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn mqtt_4_7_0_1_topic_names_have_no_wildcards() {
        assert_eq!(validate_topic_name("a/b"), Ok(()));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
    }

    #[test]
    fn mqtt_4_7_2_1_wildcards_at_the_first_level_skip_dollar_topics() {
        let table = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/+", "sport/tennis/player1", false),
            ("sport/+", "sport/", true),
            ("+", "", true),
            ("+/+", "/finance", true),
            ("#", "$SYS/x", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ];
        for (filter, topic, expected) in table {
            assert_eq!(
                topic_matches(filter, topic),
                expected,
                "{filter} vs {topic}"
            );
        }
    }

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        assert_eq!(
            parse_shared("$share/workers/sensors/#"),
            Some(("workers", "sensors/#"))
        );
        assert_eq!(parse_shared("sensors/#"), None);
    }
}
