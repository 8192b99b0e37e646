//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until the next token settles it, so a stop string split across tokens is never shown.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds newly decoded text; returns the text safe to show and whether a stop string matched
    /// (the stop string itself and anything after it are dropped, as OpenAI does).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.longest_partial_suffix();
        let emit = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (emit, false)
    }

    /// Text still held back (call when generation ends for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(h.len());
            for n in (best + 1..=max).rev() {
                let start = h.len() - n;
                if h.is_char_boundary(start) && s.starts_with(&h[start..]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (e, hit) = m.push(p);
            out.push_str(&e);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_tokens_is_cut() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["a E", "Nx", "y"]), ("a ENxy".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn nothing_is_held_without_stops() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), ("abc".into(), false));
    }

    #[test]
    fn unicode_boundaries_are_respected() {
        assert_eq!(run(&["éé"], &["aé", "é!"]), ("a".into(), true));
        assert_eq!(run(&["🤖x"], &["🤖", "y"]), ("🤖y".into(), false));
    }

    proptest::proptest! {
        /// However the text is split into pieces, the output equals cutting the whole text at
        /// the first stop string.
        #[test]
        fn split_invariant(text in "[abE]{0,40}", cuts in proptest::collection::vec(0usize..40, 0..6)) {
            let stop = "aEb";
            let want = match text.find(stop) { Some(i) => (text[..i].to_string(), true), None => (text.clone(), false) };
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            cuts.sort();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts { pieces.push(&text[last..c]); last = c; }
            pieces.push(&text[last..]);
            proptest::prop_assert_eq!(run(&[stop], &pieces), want);
        }
    }
}
