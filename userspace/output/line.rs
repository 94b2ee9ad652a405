//! One line of bcc's table, built without `fmt` machinery or allocation: this runs for
//! every connect shown.

use std::io;

use unicode_width::UnicodeWidthStr;

use crate::tracer::event::AddrText;

/// One line of bcc's table, built column by column: each column is its text, left-aligned
/// (by display width: a CJK character takes two columns) and padded to its width, then a
/// space.
pub struct Line(pub Vec<u8>);

impl Line {
    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn text(&mut self, s: &str, width: usize) {
        self.0.extend_from_slice(s.as_bytes());
        let shown = if s.is_ascii() { s.len() } else { s.width() };
        self.pad(shown, width);
    }

    pub fn address(&mut self, addr: &AddrText, width: usize) {
        self.0.extend_from_slice(addr.as_bytes());
        self.pad(addr.len(), width);
    }

    pub fn number(&mut self, n: impl itoa::Integer, width: usize) {
        let mut digits = itoa::Buffer::new();
        let s = digits.format(n);
        self.0.extend_from_slice(s.as_bytes());
        self.pad(s.len(), width);
    }

    fn pad(&mut self, shown: usize, width: usize) {
        let fill = width.saturating_sub(shown) + 1;
        self.0.resize(self.0.len() + fill, b' ');
    }

    /// Nanoseconds as milliseconds with two places, rounded half up: "0.25", "12.30".
    pub fn milliseconds(&mut self, ns: u64) {
        let n = ns / 10_000 + u64::from(ns % 10_000 >= 5_000);
        let mut digits = itoa::Buffer::new();
        self.0.extend_from_slice(digits.format(n / 100).as_bytes());
        let frac = (n % 100) as u8;
        self.0
            .extend_from_slice(&[b'.', b'0' + frac / 10, b'0' + frac % 10]);
    }
}

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
