//! Blocked terms: one Aho-Corasick automaton over all of a tenant's terms.
//!
//! Linear time and bounded memory: terms equal but for ASCII case are one pattern, so at most
//! one match per length ends at each position (at most [`MAX_TERM_BYTES`] per byte), and the
//! matches are chosen as they stream out of the automaton, keeping only those that may still
//! start before a later one (up to [`MAX_TERM_BYTES`] bytes behind the scan), never all of them.
//!
//! [`MAX_TERM_BYTES`]: crate::MAX_TERM_BYTES

use std::cmp::Reverse;
use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

use crate::{Finding, SafetyError};

pub(crate) struct Terms {
    ac: AhoCorasick,
    /// Per pattern: whether its first / last character is a word character, i.e. whether the
    /// match must not touch a word character on that side ("ass" must not match in "class",
    /// but "c++" may be followed by anything).
    edges: Vec<(bool, bool)>,
    /// The longest pattern, in bytes: how far before the scan a match can still start.
    longest: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl Terms {
    pub(crate) fn new(terms: &[String]) -> Result<Terms, SafetyError> {
        let mut terms: Vec<&str> = terms.iter().map(|t| t.trim()).collect();
        // The automaton ignores ASCII case, so such duplicates would only repeat matches.
        terms.sort_by_cached_key(|t| t.to_ascii_lowercase());
        terms.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let longest = terms.iter().map(|t| t.len()).max().unwrap_or(0);
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
        Ok(Terms { ac, edges, longest })
    }

    /// Whole-word matches, sorted by start, non-overlapping (longer first at the same start).
    pub(crate) fn find(&self, text: &str) -> Vec<Finding> {
        let mut choice = Choice::default();
        // Matches come out in the order they end, and none is longer than `longest`: once one
        // ends at `e`, every match starting before `e - longest` has been seen.
        for m in self.ac.find_overlapping_iter(text) {
            choice.settle_before(m.end().saturating_sub(self.longest));
            if self.whole_word(text, m) {
                choice.pending.insert((m.start(), Reverse(m.end())));
            }
        }
        choice.settle_before(usize::MAX);
        choice.out
    }

    /// Whether a match does not run into a word on a side where its term has a word character.
    fn whole_word(&self, text: &str, m: aho_corasick::Match) -> bool {
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
    }
}

/// Matches chosen so far, and those not yet settled: the earliest start wins, then the longest,
/// and a match overlapping a chosen one is dropped.
#[derive(Default)]
struct Choice {
    /// By start, longest first.
    pending: BTreeSet<(usize, Reverse<usize>)>,
    out: Vec<Finding>,
    last_end: usize,
}

impl Choice {
    /// Settles every pending match that starts before `start` (no later match can).
    fn settle_before(&mut self, start: usize) {
        while let Some(&(s, Reverse(e))) = self.pending.first() {
            if s >= start {
                break;
            }
            self.pending.pop_first();
            if s >= self.last_end {
                self.out.push(Finding {
                    kind: "blocked_term".to_string(),
                    start: s,
                    end: e,
                });
                self.last_end = e;
            }
        }
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

    /// What `find` chose before it streamed: every whole-word match, sorted, then greedily.
    fn sorted_choice(t: &Terms, text: &str) -> Vec<(usize, usize)> {
        let mut all: Vec<(usize, usize)> =
            t.ac.find_overlapping_iter(text)
                .filter(|m| t.whole_word(text, *m))
                .map(|m| (m.start(), m.end()))
                .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut want = Vec::new();
        let mut last = 0;
        for (s, e) in all {
            if s >= last {
                want.push((s, e));
                last = e;
            }
        }
        want
    }

    const OVERLAPPING: &[&str] = &["ab", "abc", "ABC", "bcd", "b", "c d", "cd", "x", "d ab"];

    /// A longer term sharing its start with a shorter one, a rejected match overlapping a good
    /// one, case duplicates: the streamed choice is the sorted one.
    #[test]
    fn choices_match_sorting_every_match() {
        let t = terms(OVERLAPPING);
        for text in [
            "abcd", "abc d", "xabcd", "ab cd x", "abcdabcd", "b cd", "zabc", "a b c d",
        ] {
            assert_eq!(spans(&t, text), sorted_choice(&t, text), "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn streamed_choice_is_the_sorted_one(text in "[abcdxAB ]{0,40}") {
            let t = terms(OVERLAPPING);
            proptest::prop_assert_eq!(spans(&t, &text), sorted_choice(&t, &text));
        }
    }

    /// Terms nested in each other over a run of their letter: the matches one byte ends are at
    /// most the distinct lengths, and case duplicates add none.
    #[test]
    fn nested_and_duplicate_terms_stay_bounded() {
        let mut list: Vec<String> = (1..=8).map(|n| "a".repeat(n)).collect();
        list.extend((1..=8).map(|n| "A".repeat(n)));
        let t = Terms::new(&list).unwrap();
        assert_eq!(t.edges.len(), 8);
        let text = "aaaa ".repeat(200);
        assert_eq!(spans(&t, &text).len(), 200);
        assert!(
            t.find(&"a".repeat(1_000)).is_empty(),
            "no word boundary inside"
        );
        let matches = t.ac.find_overlapping_iter(text.as_str()).count();
        assert!(matches <= 8 * text.len(), "{matches} matches");
    }
}
