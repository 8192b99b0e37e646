//! Blocked terms: one Aho-Corasick automaton over all of a tenant's terms.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use crate::{Finding, SafetyError};

pub(crate) struct Terms {
    ac: AhoCorasick,
    /// Per pattern: whether its first / last character is a word character, i.e. whether the
    /// match must not touch a word character on that side ("ass" must not match in "class",
    /// but "c++" may be followed by anything).
    edges: Vec<(bool, bool)>,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Terms {
    pub(crate) fn new(terms: &[String]) -> Result<Terms, SafetyError> {
        let terms: Vec<&str> = terms.iter().map(|t| t.trim()).collect();
        // Standard semantics is what permits overlapping search: a leftmost-longest match that
        // fails the word check must not hide a shorter or later one that passes.
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .build(&terms)
            .map_err(|e| SafetyError::Matcher(e.to_string()))?;
        let edges = terms
            .iter()
            .map(|t| {
                (
                    t.chars().next().is_some_and(is_word_char),
                    t.chars().next_back().is_some_and(is_word_char),
                )
            })
            .collect();
        Ok(Terms { ac, edges })
    }

    /// Whole-word matches, sorted by start, non-overlapping (longer first at the same start).
    pub(crate) fn find(&self, text: &str) -> Vec<Finding> {
        let mut hits: Vec<(usize, usize)> = self
            .ac
            .find_overlapping_iter(text)
            .filter(|m| {
                let (left, right) = self
                    .edges
                    .get(m.pattern().as_usize())
                    .copied()
                    .unwrap_or((true, true));
                let before = text.get(..m.start()).and_then(|s| s.chars().next_back());
                let after = text.get(m.end()..).and_then(|s| s.chars().next());
                let glued_before = left && before.is_some_and(is_word_char);
                let glued_after = right && after.is_some_and(is_word_char);
                !glued_before && !glued_after
            })
            .map(|m| (m.start(), m.end()))
            .collect();
        hits.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut out = Vec::new();
        let mut last_end = 0;
        for (start, end) in hits {
            if start >= last_end {
                out.push(Finding {
                    kind: "blocked_term".to_string(),
                    start,
                    end,
                });
                last_end = end;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(t: &[&str]) -> Terms {
        Terms::new(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn spans(t: &Terms, text: &str) -> Vec<(usize, usize)> {
        t.find(text).iter().map(|f| (f.start, f.end)).collect()
    }

    #[test]
    fn whole_words_case_insensitive() {
        let t = terms(&["ass", "Project Falcon", "c++"]);
        assert!(t.find("the class assembled in a bass passage").is_empty());
        assert_eq!(spans(&t, "you ASS!"), vec![(4, 7)]);
        assert_eq!(spans(&t, "about project falcon."), vec![(6, 20)]);
        assert!(t.find("project falcons").is_empty());
        assert_eq!(spans(&t, "I like c++11"), vec![(7, 10)]);
        assert_eq!(spans(&t, "ass_hat"), vec![]);
        assert_eq!(spans(&t, "éass"), vec![]);
    }

    #[test]
    fn a_rejected_long_match_does_not_hide_a_short_one() {
        let t = terms(&["foo bar", "bar"]);
        assert_eq!(spans(&t, "xfoo bar"), vec![(5, 8)]);
        assert_eq!(spans(&t, "foo bar"), vec![(0, 7)]);
    }
}
