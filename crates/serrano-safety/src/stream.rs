//! Streaming output filter.
//!
//! The scanner keeps the text from the first position whose verdict is not known yet (a
//! detector asked for a byte that has not arrived) and emits everything before it. Because the
//! detectors decide only from bytes they have seen, the positions, matches and therefore the
//! redacted output are exactly those of a one-shot scan of the whole stream, however it is cut.
//!
//! Latency: normal prose goes out as soon as the word it is in ends. Text is held back only
//! while it could still be PII: at most about 320 bytes for an email (64-byte local part and a
//! 253-byte domain), under 50 for numbers, up to [`TOKEN_CAP`] bytes while a key-shaped token
//! keeps going and up to [`PEM_CAP`] bytes inside a "-----BEGIN ... PRIVATE KEY-----" block,
//! which bounds memory too.
//!
//! Work: each chunk re-checks the first undecided position, reading again what its detectors
//! read. While fewer than [`EAGER_BYTES`] wait behind it that is cheap and every chunk does it;
//! past that, only once the bytes waiting have doubled (or pass [`PEM_CAP`], by which every
//! candidate but a block whose end marker straddles the cap has decided), so a long candidate
//! streamed in small chunks costs linear time, not quadratic. The price: text after such a
//! candidate may wait up to as many bytes again before it goes out (held text stays under
//! [`PEM_CAP`] and a chunk). What the scan learned from rejected candidates (`pii::Memo`) is
//! kept across chunks.
//!
//! [`TOKEN_CAP`]: crate::pii::TOKEN_CAP
//! [`PEM_CAP`]: crate::pii::PEM_CAP

use std::collections::BTreeMap;

use crate::pii::{next_hit, placeholder, KindSet, Memo, Scan, Step, PEM_CAP};
use crate::{Action, PiiKind, Verdict};

/// Bytes waiting behind an undecided position up to which every chunk re-checks it; words,
/// numbers and most PII decide within this, so ordinary text is never held longer for it.
const EAGER_BYTES: usize = 64;

/// Filters one output stream (one per choice).
#[derive(Debug, Clone)]
pub struct OutputScanner {
    action: Action,
    kinds: KindSet,
    /// Text received but not yet decided (and, except with Log, not yet emitted).
    held: String,
    /// The byte before `held`, which the detectors' word-boundary checks need.
    prev: Option<u8>,
    /// Where `held` starts in the stream.
    base: usize,
    /// What the scan learned from rejected candidates, in stream positions.
    memo: Memo,
    /// Stream length below which the next re-check would be wasted (see [`EAGER_BYTES`]).
    recheck_at: usize,
    blocked: bool,
    counts: BTreeMap<String, u32>,
}

impl OutputScanner {
    /// A scanner applying `action` to PII of `kinds` ([`PiiKind::ALL`] for every kind; an empty
    /// list lets everything through).
    pub fn new(action: Action, kinds: &[PiiKind]) -> OutputScanner {
        OutputScanner {
            action,
            kinds: KindSet::of(kinds),
            held: String::new(),
            prev: None,
            base: 0,
            memo: Memo::default(),
            recheck_at: 0,
            blocked: false,
            counts: BTreeMap::new(),
        }
    }

    /// Feeds a chunk; returns the text that is safe to emit now (possibly empty).
    ///
    /// Redact replaces matches; Block emits the text before the first match, then sets
    /// [`blocked`](Self::blocked) and emits nothing more; Log returns the chunk unchanged at once
    /// and only counts.
    pub fn push(&mut self, chunk: &str) -> String {
        if self.blocked {
            return String::new();
        }
        self.held.push_str(chunk);
        let out = if self.base + self.held.len() >= self.recheck_at {
            self.process(false)
        } else {
            String::new()
        };
        if self.action == Action::Log {
            chunk.to_string()
        } else {
            out
        }
    }

    /// End of stream: returns whatever was held back (redacted as needed).
    pub fn finish(&mut self) -> String {
        if self.blocked {
            return String::new();
        }
        let out = self.process(true);
        if self.action == Action::Log {
            String::new()
        } else {
            out
        }
    }

    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Stage "output", the scanner's action and the counts so far; `None` if nothing was found.
    pub fn verdict(&self) -> Option<Verdict> {
        (!self.counts.is_empty()).then(|| Verdict {
            stage: "output",
            action: self.action,
            kinds: self.counts.clone(),
            score: None,
        })
    }

    /// Decides as much of `held` as the known bytes allow, drops it from `held` and returns
    /// its filtered text.
    fn process(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        if self.kinds.is_empty() {
            out = std::mem::take(&mut self.held);
            self.prev = out.as_bytes().last().copied().or(self.prev);
            return out;
        }
        let mut scan = Scan {
            b: self.held.as_bytes(),
            prev0: self.prev,
            at_end,
            base: self.base,
            memo: &mut self.memo,
        };
        let mut emitted = 0;
        let mut from = 0;
        let decided = loop {
            match next_hit(&mut scan, self.kinds, from) {
                Step::Hit { start, end, kind } => {
                    *self
                        .counts
                        .entry(kind.finding_kind().to_string())
                        .or_insert(0) += 1;
                    match self.action {
                        Action::Redact => {
                            out.push_str(self.held.get(emitted..start).unwrap_or(""));
                            out.push_str(&placeholder(kind.finding_kind()));
                            emitted = end;
                        }
                        Action::Block => {
                            out.push_str(self.held.get(emitted..start).unwrap_or(""));
                            self.blocked = true;
                            self.held = String::new();
                            return out;
                        }
                        Action::Log => {}
                    }
                    from = end;
                }
                Step::Undecided(at) => break at,
                Step::Done => break self.held.len(),
            }
        };
        // `decided` is where a detector stopped, which is always an ASCII byte; the guard only
        // keeps a broken invariant from panicking.
        let mut decided = decided.max(emitted);
        while !self.held.is_char_boundary(decided) {
            decided -= 1;
        }
        out.push_str(self.held.get(emitted..decided).unwrap_or(""));
        if decided > 0 {
            self.prev = self.held.as_bytes().get(decided - 1).copied();
        }
        self.held.drain(..decided);
        self.base += decided;
        let waiting = self.held.len();
        self.recheck_at = if waiting < EAGER_BYTES {
            0
        } else {
            self.base + (2 * waiting).min(PEM_CAP + 1)
        };
        out
    }
}

#[cfg(test)]
impl OutputScanner {
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }
}
