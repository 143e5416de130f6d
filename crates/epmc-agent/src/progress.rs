//! Progress of long command-line operations (`discover`, `collect --once`) on a terminal.
//!
//! One line, rewritten in place (`\r`) at most every [`Progress::EVERY`] and cleared at the
//! end, so that what remains on the terminal is the command's own output. The command line
//! writes it to stderr only when stderr is a terminal ([`std::io::IsTerminal`]): scripts and
//! `--json` consumers see exactly what they saw before.

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line on a writer (stderr on a terminal).
#[derive(Debug)]
pub struct Progress<W: Write> {
    out: W,
    every: Duration,
    last: Option<Instant>,
    /// Characters of the line now shown (0: nothing shown).
    shown: usize,
}

impl<W: Write> Progress<W> {
    /// The shortest time between two updates of the line (at most ten a second).
    pub const EVERY: Duration = Duration::from_millis(100);

    /// A progress line on `out`, updated at most every [`Self::EVERY`].
    pub fn new(out: W) -> Progress<W> {
        Progress::with_interval(out, Self::EVERY)
    }

    /// A progress line on `out`, updated at most every `every`.
    pub fn with_interval(out: W, every: Duration) -> Progress<W> {
        Progress {
            out,
            every,
            last: None,
            shown: 0,
        }
    }

    /// Shows `line()` at `now` unless the line was updated less than the interval ago (the
    /// text is then not even made). A failed write is ignored: progress is a courtesy.
    pub fn update(&mut self, now: Instant, line: impl FnOnce() -> String) {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return;
        }
        self.last = Some(now);
        let line = line();
        let len = line.chars().count();
        // Spaces over what is left of a longer previous line.
        let pad = self.shown.saturating_sub(len);
        let _ = write!(self.out, "\r{line}{:pad$}", "");
        let _ = self.out.flush();
        self.shown = len;
    }

    /// Clears the line (if one is shown) and returns the writer.
    pub fn finish(mut self) -> W {
        if self.shown > 0 {
            let _ = write!(self.out, "\r{:width$}\r", "", width = self.shown);
            let _ = self.out.flush();
        }
        self.out
    }
}

/// `n` with thousands separated by commas: `4,096`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `discover` line: `swept 1,024/4,096 addresses, 12 projectors found`.
pub fn swept(done: usize, total: usize, found: usize) -> String {
    format!(
        "swept {}/{} addresses, {} projector{} found",
        thousands(done),
        thousands(total),
        thousands(found),
        if found == 1 { "" } else { "s" }
    )
}

/// The `collect --once` line: `read 12/40 projectors, 2 failed`.
pub fn read(done: usize, total: usize, failed: usize) -> String {
    format!(
        "read {}/{} projectors, {} failed",
        thousands(done),
        thousands(total),
        thousands(failed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(p: Progress<Vec<u8>>) -> String {
        String::from_utf8(p.finish()).expect("utf-8")
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(4096), "4,096");
        assert_eq!(thousands(65_536), "65,536");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn lines_read_well() {
        assert_eq!(
            swept(1024, 4096, 12),
            "swept 1,024/4,096 addresses, 12 projectors found"
        );
        assert_eq!(swept(1, 1, 1), "swept 1/1 addresses, 1 projector found");
        assert_eq!(read(12, 40, 2), "read 12/40 projectors, 2 failed");
    }

    #[test]
    fn at_most_one_update_per_interval_and_cleared_at_the_end() {
        let t0 = Instant::now();
        let mut p = Progress::new(Vec::new());
        let mut made = 0;
        // 1,000 completions over 0.999 s (one a millisecond): ten lines at most.
        for i in 0..1000u64 {
            p.update(t0 + Duration::from_millis(i), || {
                made += 1;
                format!("done {i}")
            });
        }
        assert_eq!(made, 10, "one line per 100 ms");
        let out = text(p);
        assert_eq!(
            out.matches('\r').count(),
            10 + 2,
            "ten updates and the clearing"
        );
        assert!(out.starts_with("\rdone 0"), "{out:?}");
        assert!(out.contains("\rdone 900"), "{out:?}");
        assert!(!out.contains("done 901"), "{out:?}");
        assert!(!out.contains('\n'), "never a new line: {out:?}");
        // Cleared: the last thing written blanks the line and returns to its start.
        assert!(out.ends_with(&format!("\r{}\r", " ".repeat("done 900".len()))));
    }

    #[test]
    fn a_shorter_line_blanks_what_the_longer_one_left() {
        let t0 = Instant::now();
        let mut p = Progress::with_interval(Vec::new(), Duration::ZERO);
        p.update(t0, || "swept 10/10,000 addresses".into());
        p.update(t0, || "short".into());
        let out = text(p);
        let second = out.split('\r').nth(2).expect("second line");
        assert_eq!(second.len(), "swept 10/10,000 addresses".len());
        assert!(second.starts_with("short "));
    }

    #[test]
    fn nothing_shown_nothing_cleared() {
        let p = Progress::new(Vec::new());
        assert!(text(p).is_empty());
    }
}
