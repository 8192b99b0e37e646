//! PII detectors.
//!
//! Every detector is a hand-written scanner anchored at one start position rather than a regex
//! searched over the text, for two reasons:
//!
//! * Precision: checksums (Luhn, mod-97), octet ranges and "longest prefix that validates"
//!   need code anyway, and card numbers followed by another number ("4111 1111 1111 1111 2x")
//!   are only found by trying the shorter groupings too.
//! * Streaming: a detector reads its bytes only through [`Cur::get`], which reports [`More`]
//!   when a byte is not known yet. A decision is therefore a function of bytes that are all
//!   present, so deciding on a prefix of a stream gives exactly what deciding on the whole text
//!   gives, which is what makes chunked redaction equal one-shot redaction.
//!
//! The scan is greedy: at each position take the longest match of any enabled detector (ties go
//! to the earlier kind in [`PiiKind::ALL`]) and continue after it, which is the same as sorting all
//! matches by start, preferring the longer, and dropping overlaps.
//!
//! Linear time: a detector that rejects a candidate after reading a long run (a key shape whose
//! body has no digit, a JWT without its dots, an email's local part) notes in a [`Memo`] what
//! that run proves about the starts inside it, so the next start does not read the run again.
//! Without it, "-sk-sk-sk-..." cost ~1,000 byte reads per byte. What a memo holds is a fact
//! about bytes already read, so consulting it gives exactly the answer reading them again would.

use crate::{Finding, PiiKind};

/// Longest secret token matched; longer runs are redacted up to here (bounds streaming memory).
pub(crate) const TOKEN_CAP: usize = 4096;
/// Longest PEM private-key block; an unterminated or longer one is redacted up to here.
pub(crate) const PEM_CAP: usize = 8192;

/// A decision needs a byte that has not arrived yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct More;

type Found = Result<Option<usize>, More>;

/// Most characters of an email's local part (RFC 5321).
const LOCAL_MAX: usize = 64;

/// The text from a candidate start onwards, as far as it is known.
struct Cur<'a> {
    b: &'a [u8],
    /// Whether `b` runs to the end of the text (so a missing byte is the end, not "not yet").
    at_end: bool,
    /// Where `b` starts in the whole text (or stream): the positions a [`Memo`] keeps.
    at: usize,
}

#[cfg(test)]
thread_local! {
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes the detectors have read on this thread so far: the tests' measure of scanning work.
#[cfg(test)]
pub(crate) fn reads() -> u64 {
    READS.with(|r| r.get())
}

impl Cur<'_> {
    fn get(&self, i: usize) -> Result<Option<u8>, More> {
        #[cfg(test)]
        READS.with(|r| r.set(r.get() + 1));
        match self.b.get(i) {
            Some(&x) => Ok(Some(x)),
            None if self.at_end => Ok(None),
            None => Err(More),
        }
    }

    fn is(&self, i: usize, pred: impl Fn(u8) -> bool) -> Result<bool, More> {
        Ok(self.get(i)?.is_some_and(pred))
    }

    fn starts_with(&self, i: usize, lit: &[u8]) -> Result<bool, More> {
        for (k, &x) in lit.iter().enumerate() {
            if self.get(i + k)? != Some(x) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Bytes `a..b` that a detector has already read (so they are present).
    fn bytes(&self, a: usize, b: usize) -> &[u8] {
        self.b.get(a..b).unwrap_or(&[])
    }

    /// From `from`, the first position whose byte is not in `class` or is a `stop`, reading only
    /// bytes already known (never [`More`]): `(position, what is there)`.
    fn run_end(&self, from: usize, class: fn(u8) -> bool, stop: fn(u8) -> bool) -> (usize, RunEnd) {
        let mut i = from;
        loop {
            match self.get(i) {
                Ok(Some(b)) if class(b) && !stop(b) => i += 1,
                Ok(Some(b)) if class(b) => return (i, RunEnd::Stop),
                Ok(_) => return (i, RunEnd::Outside),
                Err(More) => return (i, RunEnd::Unknown),
            }
        }
    }
}

/// What ends a run [`Cur::run_end`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// A byte outside the class, or the end of the text.
    Outside,
    /// A byte of the class that the caller stops at.
    Stop,
    /// The first byte not known yet.
    Unknown,
}

/// What a scan has learned from the candidates it rejected (see the module's comment). A
/// stream keeps one across its chunks; positions are in the whole text.
#[derive(Debug, Clone, Default)]
pub(crate) struct Memo {
    /// Per key shape (by index in [`SHAPES`]): no match of that shape starts before this.
    shape_skip: [usize; SHAPES.len()],
    /// No JWT starts before this.
    jwt_skip: usize,
    /// The run of local-part bytes an email scan read last.
    local: Option<LocalRun>,
    /// The domain an email scan read last: its '@' and where the address ends (`None`: it is not
    /// a domain).
    domain: Option<(usize, Option<usize>)>,
    /// Tests: forget everything at every start, which is how the scan read before the memo.
    #[cfg(test)]
    pub(crate) forgetful: bool,
}

/// Bytes `from..to` are local-part characters with no two dots in a row and no '@'; `end` says
/// what the byte at `to` is, once it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LocalRun {
    from: usize,
    to: usize,
    end: Option<LocalEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalEnd {
    At,
    /// Anything else that ends a local part: another byte, a second dot, the end of the text.
    Other,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_digit(b: u8) -> bool {
    b.is_ascii_digit()
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_hexdigit()
}

/// A set of enabled kinds, cheap to copy into the hot loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KindSet(u8);

impl KindSet {
    pub(crate) fn of(kinds: &[PiiKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |m, k| m | (1 << *k as u8)))
    }
    fn has(self, k: PiiKind) -> bool {
        self.0 & (1 << k as u8) != 0
    }
    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The longest match starting at the cursor, if any.
fn candidate(
    prev: Option<u8>,
    c: &Cur,
    kinds: KindSet,
    memo: &mut Memo,
) -> Result<Option<(usize, PiiKind)>, More> {
    // Every detector starts on an ASCII byte; this keeps positions on char boundaries.
    match c.get(0)? {
        Some(b) if b.is_ascii() && !b.is_ascii_whitespace() => {}
        _ => return Ok(None),
    }
    let mut best: Option<(usize, PiiKind)> = None;
    for kind in PiiKind::ALL {
        if !kinds.has(kind) {
            continue;
        }
        let found = match kind {
            PiiKind::Email => email(prev, c, memo)?,
            PiiKind::Phone => max(e164(prev, c)?, nanp(prev, c)?),
            PiiKind::PaymentCard => card(prev, c)?,
            PiiKind::Iban => iban(prev, c)?,
            PiiKind::UsSsn => ssn(prev, c)?,
            PiiKind::IpAddress => max(ipv4(prev, c)?, ipv6(prev, c)?),
            PiiKind::Secret => secret(prev, c, memo)?,
        };
        if let Some(len) = found.filter(|&l| l > 0) {
            if best.is_none_or(|(b, _)| len > b) {
                best = Some((len, kind));
            }
        }
    }
    Ok(best)
}

fn max(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    a.max(b)
}

/// One step of the greedy scan.
pub(crate) enum Step {
    Hit {
        start: usize,
        end: usize,
        kind: PiiKind,
    },
    /// Nothing before this position matches, and whether something starts here is not known yet.
    Undecided(usize),
    Done,
}

/// Where a scan is: the known text, and what it has learned.
pub(crate) struct Scan<'a> {
    pub(crate) b: &'a [u8],
    /// The byte before `b[0]` (streaming keeps it from text already emitted).
    pub(crate) prev0: Option<u8>,
    /// Whether `b` runs to the end of the text.
    pub(crate) at_end: bool,
    /// Where `b` starts in the whole text.
    pub(crate) base: usize,
    pub(crate) memo: &'a mut Memo,
}

/// Scans from `from` (an index into `scan.b`) to the next match.
pub(crate) fn next_hit(scan: &mut Scan, kinds: KindSet, from: usize) -> Step {
    let b = scan.b;
    let mut s = from;
    while s < b.len() {
        let prev = if s == 0 {
            scan.prev0
        } else {
            b.get(s - 1).copied()
        };
        let cur = Cur {
            b: b.get(s..).unwrap_or(&[]),
            at_end: scan.at_end,
            at: scan.base + s,
        };
        #[cfg(test)]
        if scan.memo.forgetful {
            *scan.memo = Memo {
                forgetful: true,
                ..Memo::default()
            };
        }
        match candidate(prev, &cur, kinds, scan.memo) {
            Err(More) => return Step::Undecided(s),
            Ok(Some((len, kind))) => {
                return Step::Hit {
                    start: s,
                    end: s + len,
                    kind,
                }
            }
            Ok(None) => s += 1,
        }
    }
    Step::Done
}

/// Finds PII of the given kinds; findings are sorted by start and never overlap.
pub fn scan_pii(text: &str, kinds: &[PiiKind]) -> Vec<Finding> {
    scan_with(text, kinds, Memo::default())
}

/// [`scan_pii`] reading every candidate afresh, as the scan did before [`Memo`]: the reference
/// the memo must agree with.
#[cfg(test)]
pub(crate) fn scan_pii_forgetful(text: &str, kinds: &[PiiKind]) -> Vec<Finding> {
    let memo = Memo {
        forgetful: true,
        ..Memo::default()
    };
    scan_with(text, kinds, memo)
}

fn scan_with(text: &str, kinds: &[PiiKind], mut memo: Memo) -> Vec<Finding> {
    let kinds = KindSet::of(kinds);
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    let mut scan = Scan {
        b: text.as_bytes(),
        prev0: None,
        at_end: true,
        base: 0,
        memo: &mut memo,
    };
    let mut s = 0;
    while let Step::Hit { start, end, kind } = next_hit(&mut scan, kinds, s) {
        out.push(Finding {
            kind: kind.finding_kind().to_string(),
            start,
            end,
        });
        s = end;
    }
    out
}

/// The placeholder a finding of `kind` ("pii.email", "blocked_term") is replaced with.
pub(crate) fn placeholder(kind: &str) -> String {
    let label = kind.strip_prefix("pii.").unwrap_or(kind);
    format!("[REDACTED:{}]", label.to_ascii_uppercase())
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Replaces each finding's span by `[REDACTED:KIND]`. Overlapping findings are merged (the
/// earlier one names the merged span) and spans are widened to char boundaries, so no part of a
/// finding survives whatever the input.
pub fn redact(text: &str, findings: &[Finding]) -> String {
    let mut spans: Vec<(usize, usize, &str)> = findings
        .iter()
        .map(|f| {
            (
                floor_boundary(text, f.start),
                ceil_boundary(text, f.end),
                f.kind.as_str(),
            )
        })
        .filter(|(a, b, _)| a < b)
        .collect();
    spans.sort_by(|x, y| x.0.cmp(&y.0).then(y.1.cmp(&x.1)));
    let mut out = String::with_capacity(text.len());
    let mut cursor = 0;
    let mut open: Option<(usize, usize, &str)> = None;
    for span in spans {
        match open {
            Some((a, b, k)) if span.0 < b => open = Some((a, b.max(span.1), k)),
            _ => {
                if let Some((a, b, k)) = open {
                    out.push_str(text.get(cursor..a).unwrap_or(""));
                    out.push_str(&placeholder(k));
                    cursor = b;
                }
                open = Some(span);
            }
        }
    }
    if let Some((a, b, k)) = open {
        out.push_str(text.get(cursor..a).unwrap_or(""));
        out.push_str(&placeholder(k));
        cursor = b;
    }
    out.push_str(text.get(cursor..).unwrap_or(""));
    out
}

// ---------------------------------------------------------------------------------------------
// email

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn email(prev: Option<u8>, c: &Cur, memo: &mut Memo) -> Found {
    // A '.' before is allowed so "...john@x.com" is still caught; after an '@' this would be
    // the domain of something else ("a@b@c.com").
    if prev.is_some_and(|p| (is_local(p) && p != b'.') || p == b'@') {
        return Ok(None);
    }
    let Some(i) = local_part(c, &mut memo.local)? else {
        return Ok(None);
    };
    if i == 0 || c.get(i - 1)? == Some(b'.') {
        return Ok(None);
    }
    // Every start whose local part ends at this '@' shares its domain: read it once.
    let at = c.at + i;
    if let Some((_, end)) = memo.domain.filter(|d| d.0 == at) {
        return Ok(end.map(|e| e - c.at));
    }
    let end = domain(c, i + 1)?;
    memo.domain = Some((at, end.map(|e| c.at + e)));
    Ok(end)
}

/// The offset of the '@' ending a local part that starts at the cursor: 1 to [`LOCAL_MAX`]
/// local characters, not starting with a dot nor holding two in a row. A start inside the run
/// an earlier start read goes on from where that one stopped.
fn local_part(c: &Cur, memo: &mut Option<LocalRun>) -> Result<Option<usize>, More> {
    if c.get(0)? == Some(b'.') {
        return Ok(None);
    }
    let a = c.at;
    let mut run = match *memo {
        Some(r) if r.from <= a && a < r.to => r,
        _ => LocalRun {
            from: a,
            to: a,
            end: None,
        },
    };
    while run.end.is_none() && run.to - a <= LOCAL_MAX {
        let i = run.to - a;
        let b = match c.get(i) {
            Ok(b) => b,
            Err(More) => {
                *memo = Some(run);
                return Err(More);
            }
        };
        match b {
            Some(b'@') => run.end = Some(LocalEnd::At),
            Some(b'.') if i > 0 && c.get(i - 1)? == Some(b'.') => run.end = Some(LocalEnd::Other),
            Some(x) if is_local(x) => run.to += 1,
            _ => run.end = Some(LocalEnd::Other),
        }
    }
    *memo = Some(run);
    let i = run.to - a;
    Ok((run.end == Some(LocalEnd::At) && i <= LOCAL_MAX).then_some(i))
}

/// The end of an email whose domain starts at `domain` (right after its '@'): labels of
/// letters, digits and inner dashes, at least two, an alphabetic TLD, 253 bytes at most.
fn domain(c: &Cur, domain: usize) -> Found {
    let mut pos = domain;
    let mut labels = 0;
    let mut last;
    loop {
        let start = pos;
        while c.is(pos, |b| b.is_ascii_alphanumeric() || b == b'-')? {
            pos += 1;
            if pos - start > 63 {
                return Ok(None);
            }
        }
        if pos == start || c.get(start)? == Some(b'-') || c.get(pos - 1)? == Some(b'-') {
            return Ok(None);
        }
        labels += 1;
        last = (start, pos);
        if pos - domain > 253 {
            return Ok(None);
        }
        if c.get(pos)? == Some(b'.') && c.is(pos + 1, |b| b.is_ascii_alphanumeric())? {
            pos += 1;
        } else {
            break;
        }
    }
    let tld = c.bytes(last.0, last.1);
    if labels < 2 || tld.len() < 2 || !tld.iter().all(u8::is_ascii_alphabetic) {
        return Ok(None);
    }
    if c.is(pos, |b| b == b'_' || b == b'@')? {
        return Ok(None);
    }
    Ok(Some(pos))
}

// ---------------------------------------------------------------------------------------------
// phone

fn is_phone_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.')
}

/// "+" then 8 to 15 digits in groups separated by one space, dash or dot, or parenthesised.
fn e164(prev: Option<u8>, c: &Cur) -> Found {
    if c.get(0)? != Some(b'+') || prev.is_some_and(|p| is_word(p) || p == b'+') {
        return Ok(None);
    }
    if !c.is(1, |b| (b'1'..=b'9').contains(&b))? {
        return Ok(None);
    }
    let mut pos = 1;
    let mut digits = 0;
    let mut best = None;
    loop {
        if c.get(pos)? == Some(b'(') {
            let start = pos + 1;
            pos = start;
            while c.is(pos, is_digit)? {
                pos += 1;
                if pos - start > 5 {
                    return Ok(best);
                }
            }
            if pos == start || c.get(pos)? != Some(b')') {
                return Ok(best);
            }
            digits += pos - start;
            pos += 1;
        } else {
            let start = pos;
            while c.is(pos, is_digit)? {
                pos += 1;
                if digits + pos - start > 15 {
                    return Ok(best);
                }
            }
            if pos == start {
                return Ok(best);
            }
            digits += pos - start;
        }
        if digits > 15 {
            return Ok(best);
        }
        let next = c.get(pos)?;
        if digits >= 8 && !next.is_some_and(is_word) {
            best = Some(pos);
        }
        match next {
            Some(b'(') => {}
            Some(d) if is_digit(d) => {}
            Some(s) if is_phone_sep(s) && c.is(pos + 1, |b| is_digit(b) || b == b'(')? => pos += 1,
            _ => return Ok(best),
        }
    }
}

/// Three digits at `at`, the first 2-9 (NANP area codes and exchanges never start with 0 or 1).
fn nxx(c: &Cur, at: usize) -> Result<bool, More> {
    Ok(c.is(at, |b| (b'2'..=b'9').contains(&b))?
        && c.is(at + 1, is_digit)?
        && c.is(at + 2, is_digit)?)
}

/// (415) 555-2671, 415-555-2671, 415.555.2671, optionally after "1-" / "1 ".
fn nanp(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(|p| is_word(p) || matches!(p, b'.' | b'-' | b'+')) {
        return Ok(None);
    }
    let mut pos = 0;
    if c.get(0)? == Some(b'1') && c.is(1, is_phone_sep)? && c.is(2, |b| is_digit(b) || b == b'(')? {
        pos = 2;
    }
    if c.get(pos)? == Some(b'(') {
        if !nxx(c, pos + 1)? || c.get(pos + 4)? != Some(b')') {
            return Ok(None);
        }
        pos += 5;
        if c.get(pos)? == Some(b' ') {
            pos += 1;
        }
        if !nxx(c, pos)? || !c.is(pos + 3, is_phone_sep)? {
            return Ok(None);
        }
        pos += 4;
    } else {
        if !nxx(c, pos)? {
            return Ok(None);
        }
        let sep = c.get(pos + 3)?;
        if !matches!(sep, Some(b'-' | b'.')) || !nxx(c, pos + 4)? || c.get(pos + 7)? != sep {
            return Ok(None);
        }
        pos += 8;
    }
    for k in 0..4 {
        if !c.is(pos + k, is_digit)? {
            return Ok(None);
        }
    }
    pos += 4;
    if !number_ends(c, pos, b".-")? {
        return Ok(None);
    }
    Ok(Some(pos))
}

/// Whether a number ending before `pos` really ends there: no word character follows, nor one
/// of `joiners` followed by a digit (which would make it part of a longer number, date or
/// version string).
fn number_ends(c: &Cur, pos: usize, joiners: &[u8]) -> Result<bool, More> {
    match c.get(pos)? {
        Some(b) if is_word(b) => Ok(false),
        Some(b) if joiners.contains(&b) => Ok(!c.is(pos + 1, is_digit)?),
        _ => Ok(true),
    }
}

// ---------------------------------------------------------------------------------------------
// payment card

/// Luhn check over digit values (0-9).
pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    // Not `is_multiple_of`: that needs Rust 1.87 and the MSRV is 1.85.
    let rest = sum % 10;
    !digits.is_empty() && rest == 0
}

/// 13-19 digits starting 2-6 (the card industries), ungrouped or in groups of 4-6 separated by
/// one consistent space or dash (the last group may be shorter), passing Luhn. The longest
/// valid grouping wins.
fn card(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(|p| is_word(p) || p == b'.') {
        return Ok(None);
    }
    if !c.is(0, |b| (b'2'..=b'6').contains(&b))? {
        return Ok(None);
    }
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut pos = 0;
    let mut group = 0;
    let mut sep: Option<u8> = None;
    let mut best = None;
    loop {
        while let Some(d) = c.get(pos)?.filter(|&b| is_digit(b)) {
            match digits.get_mut(n) {
                Some(slot) => *slot = d - b'0',
                None => return Ok(best),
            }
            n += 1;
            group += 1;
            pos += 1;
        }
        if n >= 13 && number_ends(c, pos, b".,")? && luhn(digits.get(..n).unwrap_or(&[])) {
            best = Some(pos);
        }
        match c.get(pos)? {
            Some(s @ (b' ' | b'-')) if sep.is_none_or(|x| x == s) && c.is(pos + 1, is_digit)? => {
                if !(4..=6).contains(&group) {
                    return Ok(best);
                }
                sep = Some(s);
                group = 0;
                pos += 1;
            }
            _ => return Ok(best),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IBAN

/// ISO 7064 mod-97-10 over an IBAN's characters (uppercase letters and digits).
pub(crate) fn mod97(iban: &[u8]) -> bool {
    let Some((head, tail)) = iban.split_at_checked(4) else {
        return false;
    };
    let mut r: u32 = 0;
    for &ch in tail.iter().chain(head) {
        r = match ch {
            b'0'..=b'9' => (r * 10 + u32::from(ch - b'0')) % 97,
            b'A'..=b'Z' => (r * 100 + u32::from(ch - b'A') + 10) % 97,
            _ => return false,
        };
    }
    r == 1
}

fn is_iban_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

/// Country code, two check digits and 11-30 more uppercase alphanumerics, unspaced or in
/// space-separated groups of four; 15-34 characters passing mod-97.
fn iban(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(is_word) {
        return Ok(None);
    }
    let upper = |b: u8| b.is_ascii_uppercase();
    if !(c.is(0, upper)? && c.is(1, upper)? && c.is(2, is_digit)? && c.is(3, is_digit)?) {
        return Ok(None);
    }
    let mut chars = [0u8; 34];
    for (slot, &b) in chars.iter_mut().zip(c.bytes(0, 4)) {
        *slot = b;
    }
    let mut n = 4;
    let mut pos = 4;
    if c.is(4, is_iban_char)? {
        while let Some(b) = c.get(pos)?.filter(|&b| is_iban_char(b)) {
            match chars.get_mut(n) {
                Some(slot) => *slot = b,
                None => return Ok(None),
            }
            n += 1;
            pos += 1;
        }
        let ok = n >= 15 && !c.is(pos, is_word)? && mod97(chars.get(..n).unwrap_or(&[]));
        return Ok(ok.then_some(pos));
    }
    if !(c.get(4)? == Some(b' ') && c.is(5, is_iban_char)?) {
        return Ok(None);
    }
    let mut best = None;
    loop {
        pos += 1;
        let start = pos;
        while pos - start < 4 {
            let Some(b) = c.get(pos)?.filter(|&b| is_iban_char(b)) else {
                break;
            };
            match chars.get_mut(n) {
                Some(slot) => *slot = b,
                None => return Ok(best),
            }
            n += 1;
            pos += 1;
        }
        let next = c.get(pos)?;
        if next.is_some_and(is_word) {
            return Ok(best);
        }
        if n >= 15 && mod97(chars.get(..n).unwrap_or(&[])) {
            best = Some(pos);
        }
        if !(pos - start == 4 && next == Some(b' ') && c.is(pos + 1, is_iban_char)?) {
            return Ok(best);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// US SSN

/// AAA-GG-SSSS, excluding area 000, 666 and 900-999, group 00 and serial 0000 (never issued).
fn ssn(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(|p| is_word(p) || matches!(p, b'-' | b'.')) {
        return Ok(None);
    }
    let mut v = [0u32; 3];
    let mut part = 0;
    for (k, &shape) in b"ddd-dd-dddd".iter().enumerate() {
        let b = c.get(k)?;
        match (shape, b) {
            (b'd', Some(d)) if is_digit(d) => {
                if let Some(x) = v.get_mut(part) {
                    *x = *x * 10 + u32::from(d - b'0');
                }
            }
            (b'-', Some(b'-')) => part += 1,
            _ => return Ok(None),
        }
    }
    let [area, group, serial] = v;
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return Ok(None);
    }
    Ok(number_ends(c, 11, b"-.")?.then_some(11))
}

// ---------------------------------------------------------------------------------------------
// IP addresses

/// A dotted quad at `at` (octets 0-255, no leading zeros); its end.
fn dotted_quad(c: &Cur, at: usize) -> Found {
    let mut pos = at;
    for i in 0..4 {
        if i > 0 {
            if c.get(pos)? != Some(b'.') {
                return Ok(None);
            }
            pos += 1;
        }
        let start = pos;
        let mut v = 0u32;
        while let Some(d) = c.get(pos)?.filter(|&b| is_digit(b)) {
            if pos - start == 3 {
                return Ok(None);
            }
            v = v * 10 + u32::from(d - b'0');
            pos += 1;
        }
        let len = pos - start;
        if len == 0 || v > 255 || (len > 1 && c.get(start)? == Some(b'0')) {
            return Ok(None);
        }
    }
    Ok(Some(pos))
}

fn ipv4(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(|p| is_word(p) || p == b'.') {
        return Ok(None);
    }
    let Some(end) = dotted_quad(c, 0)? else {
        return Ok(None);
    };
    Ok(number_ends(c, end, b".")?.then_some(end))
}

/// Full or "::"-compressed IPv6, optionally ending in a dotted quad.
fn ipv6(prev: Option<u8>, c: &Cur) -> Found {
    if prev.is_some_and(|p| is_word(p) || matches!(p, b':' | b'.')) {
        return Ok(None);
    }
    let mut pos = 0;
    let mut groups = 0;
    let mut compressed = false;
    let mut leading = false;
    let mut long_group = false;
    if c.get(0)? == Some(b':') {
        if c.get(1)? != Some(b':') {
            return Ok(None);
        }
        compressed = true;
        leading = true;
        pos = 2;
    }
    loop {
        let start = pos;
        while c.is(pos, is_hex)? {
            pos += 1;
            if pos - start > 4 {
                return Ok(None);
            }
        }
        if pos == start {
            // Only reachable straight after "::": the address ends with it.
            break;
        }
        if c.get(pos)? == Some(b'.') {
            if groups > 6 {
                return Ok(None);
            }
            let Some(end) = dotted_quad(c, start)? else {
                return Ok(None);
            };
            groups += 2;
            pos = end;
            break;
        }
        groups += 1;
        long_group |= pos - start >= 3;
        if groups > 8 {
            return Ok(None);
        }
        if c.get(pos)? == Some(b':') {
            if c.get(pos + 1)? == Some(b':') {
                if compressed {
                    break;
                }
                compressed = true;
                pos += 2;
                continue;
            }
            if c.is(pos + 1, is_hex)? {
                pos += 1;
                continue;
            }
        }
        break;
    }
    let valid = if compressed {
        (1..=7).contains(&groups)
    } else {
        groups == 8
    };
    // "a::b" or "dead::beef" are far more often code than addresses.
    if !valid || (compressed && groups < 3 && !leading && !long_group) {
        return Ok(None);
    }
    match c.get(pos)? {
        Some(b) if is_word(b) => return Ok(None),
        Some(b':') if c.is(pos + 1, |b| is_hex(b) || b == b':')? => return Ok(None),
        Some(b'.') if c.is(pos + 1, is_digit)? => return Ok(None),
        _ => {}
    }
    Ok(Some(pos))
}

// ---------------------------------------------------------------------------------------------
// secrets

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_upper_alnum(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

fn is_slack(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

fn is_github_pat(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// A key shape: a literal prefix then a run of body characters.
struct Shape {
    prefix: &'static [u8],
    body: fn(u8) -> bool,
    min: usize,
    /// A longer run means it is not this kind of key (AWS ids have a fixed length).
    max: Option<usize>,
    /// Generic prefixes also show up in prose ("sk-learn-..."); real keys are random.
    need_digit: bool,
}

const SHAPES: &[Shape] = &[
    shape(b"sk-srn-", is_token, 32, None, false),
    shape(b"sk-proj-", is_token, 20, None, false),
    shape(b"sk-ant-", is_token, 20, None, false),
    shape(b"sk-", is_token, 20, None, true),
    shape(b"AKIA", is_upper_alnum, 16, Some(16), false),
    shape(b"ASIA", is_upper_alnum, 16, Some(16), false),
    shape(b"ghp_", is_alnum, 30, None, false),
    shape(b"gho_", is_alnum, 30, None, false),
    shape(b"ghs_", is_alnum, 30, None, false),
    shape(b"ghu_", is_alnum, 30, None, false),
    shape(b"ghr_", is_alnum, 30, None, false),
    shape(b"github_pat_", is_github_pat, 22, None, false),
    shape(b"xoxb-", is_slack, 10, None, true),
    shape(b"xoxa-", is_slack, 10, None, true),
    shape(b"xoxp-", is_slack, 10, None, true),
    shape(b"xoxr-", is_slack, 10, None, true),
    shape(b"xoxs-", is_slack, 10, None, true),
    shape(b"AIza", is_token, 35, None, false),
    shape(b"sk_live_", is_alnum, 16, None, false),
    shape(b"rk_live_", is_alnum, 16, None, false),
    shape(b"sk_test_", is_alnum, 16, None, false),
    shape(b"rk_test_", is_alnum, 16, None, false),
];

const fn shape(
    prefix: &'static [u8],
    body: fn(u8) -> bool,
    min: usize,
    max: Option<usize>,
    need_digit: bool,
) -> Shape {
    Shape {
        prefix,
        body,
        min,
        max,
        need_digit,
    }
}

fn secret(prev: Option<u8>, c: &Cur, memo: &mut Memo) -> Found {
    // PEM blocks often follow "key:\n" or sit inside quotes; they need no boundary before.
    let mut best = pem(c)?;
    if prev.is_some_and(is_word) {
        return Ok(best);
    }
    for (s, skip) in SHAPES.iter().zip(&mut memo.shape_skip) {
        if let Some(len) = token_shape(c, s, skip)? {
            best = best.max(Some(len));
        }
    }
    Ok(best.max(jwt(c, &mut memo.jwt_skip)?))
}

fn token_shape(c: &Cur, s: &Shape, skip: &mut usize) -> Found {
    if c.at < *skip || !c.starts_with(0, s.prefix)? {
        return Ok(None);
    }
    let start = s.prefix.len();
    let mut pos = start;
    while pos < TOKEN_CAP && c.is(pos, s.body)? {
        pos += 1;
        if s.max.is_some_and(|m| pos - start > m) {
            return Ok(None);
        }
    }
    let len = pos - start;
    if len < s.min || (s.need_digit && !c.bytes(start, pos).iter().any(u8::is_ascii_digit)) {
        if let Some(next) = shape_rejected(c, s, pos) {
            *skip = c.at + next;
        }
        return Ok(None);
    }
    Ok(Some(pos))
}

/// After `s` was rejected at the cursor with its body read to `pos` (too short, or no digit
/// where one is needed): the first offset where it may match again, if the run proves one.
///
/// A shape with a fixed length (`max`) proves nothing (a later, shorter run may fit), nor one
/// whose prefix has bytes outside its body. Otherwise a start inside the run has its prefix in
/// the run too, and its body is the rest of the run, so:
/// - if the run ended before [`TOKEN_CAP`], every start before its end reads a shorter body
///   with no more digits: rejected;
/// - if the run was capped (only a missing digit rejects then), a start reads [`TOKEN_CAP`]
///   bytes from itself: rejected while those hold no digit, so up to the next digit (or the
///   run's end, or what is known) less the cap. That reads on past the cap once, and the
///   starts skipped pay for it.
fn shape_rejected(c: &Cur, s: &Shape, pos: usize) -> Option<usize> {
    if s.max.is_some() || !s.prefix.iter().all(|&b| (s.body)(b)) {
        return None;
    }
    if pos < TOKEN_CAP {
        return Some(pos);
    }
    let stop: fn(u8) -> bool = if s.need_digit {
        |b| b.is_ascii_digit()
    } else {
        |_| false
    };
    match c.run_end(pos, s.body, stop) {
        (end, RunEnd::Outside) => Some(end),
        (end, RunEnd::Stop | RunEnd::Unknown) => Some(end + 1 - TOKEN_CAP),
    }
}

/// Reads a base64url run from `pos`; false if it hit the cap.
fn token_run(c: &Cur, pos: &mut usize) -> Result<bool, More> {
    while c.is(*pos, is_token)? {
        *pos += 1;
        if *pos >= TOKEN_CAP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// header.payload.signature where both header and payload are base64url JSON objects ("eyJ").
///
/// A rejected candidate sets `skip` (see [`Memo`]): a start inside its header run ("eyJ" is in
/// the run) has the same header end and the same bytes after it, so it is rejected for the same
/// reason, unless the header was capped, which holds only for starts a cap's length before
/// the run's end.
fn jwt(c: &Cur, skip: &mut usize) -> Found {
    if c.at < *skip || !c.starts_with(0, b"eyJ")? {
        return Ok(None);
    }
    let mut pos = 3;
    if !token_run(c, &mut pos)? {
        let (end, _) = c.run_end(pos, is_token, |_| false);
        *skip = c.at + end + 1 - TOKEN_CAP;
        return Ok(None);
    }
    let header_end = pos;
    let rejected = |skip: &mut usize| {
        *skip = c.at + header_end;
        Ok(None)
    };
    if pos < 8 || c.get(pos)? != Some(b'.') {
        return rejected(skip);
    }
    pos += 1;
    if !c.starts_with(pos, b"eyJ")? {
        return rejected(skip);
    }
    pos += 3;
    if !token_run(c, &mut pos)? {
        return Ok(Some(pos));
    }
    if c.get(pos)? != Some(b'.') {
        return rejected(skip);
    }
    pos += 1;
    token_run(c, &mut pos)?;
    Ok(Some(pos))
}

fn pem_label(c: &Cur, pos: &mut usize) -> Result<bool, More> {
    let start = *pos;
    while c.is(*pos, |b| {
        b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '
    })? {
        *pos += 1;
        if *pos - start > 64 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// "-----BEGIN ... PRIVATE KEY-----" through the matching "-----END ...-----". The span runs
/// to the end of the text if the block is unterminated, and stops at [`PEM_CAP`] if it is
/// longer.
fn pem(c: &Cur) -> Found {
    if !c.starts_with(0, b"-----BEGIN ")? {
        return Ok(None);
    }
    let mut pos = 11;
    if !pem_label(c, &mut pos)? {
        return Ok(None);
    }
    let label = c.bytes(11, pos);
    if !(label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK")) {
        return Ok(None);
    }
    if !c.starts_with(pos, b"-----")? {
        return Ok(None);
    }
    pos += 5;
    // A prose mention of the header is not a key: require a key body to follow.
    let ws = pos;
    while c.is(pos, |b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))? {
        pos += 1;
        if pos - ws > 64 {
            return Ok(None);
        }
    }
    let mut body = c.starts_with(pos, b"Proc-Type:")?;
    if !body {
        body = true;
        for k in 0..16 {
            if !c.is(pos + k, |b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
            })? {
                body = false;
                break;
            }
        }
    }
    if !body {
        return Ok(None);
    }
    let mut p = pos;
    loop {
        if p >= PEM_CAP {
            return Ok(Some(cap_boundary(c, PEM_CAP)?));
        }
        match c.get(p)? {
            None => return Ok(Some(p)),
            Some(b'-') if c.starts_with(p, b"-----END ")? => {
                let mut q = p + 9;
                if pem_label(c, &mut q)? && c.starts_with(q, b"-----")? {
                    let end = q + 5;
                    return Ok(Some(if end <= PEM_CAP {
                        end
                    } else {
                        cap_boundary(c, PEM_CAP)?
                    }));
                }
            }
            _ => {}
        }
        p += 1;
    }
}

/// `at` moved back to a char boundary.
fn cap_boundary(c: &Cur, mut at: usize) -> Result<usize, More> {
    while at > 0 && c.is(at, |b| (0x80..0xC0).contains(&b))? {
        at -= 1;
    }
    Ok(at)
}
