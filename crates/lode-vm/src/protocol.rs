//! The exit-status protocol on the guest's serial console.
//!
//! QEMU's serial port carries everything the guest prints: the firmware's banner, what
//! the kernel says despite `quiet`, the guest init's own errors, and the command's
//! output. The init frames the command with two marker lines carrying a token drawn
//! afresh for each run (128 random bits, hex), which the command never sees on its
//! command line or in its environment, so output of the command cannot be taken for a
//! marker by accident:
//!
//! ```text
//! <firmware and kernel noise>@lode:TOKEN:start\n
//! <the command's output, byte for byte>@lode:TOKEN:exit:STATUS\n
//! ```
//!
//! The command's output is exactly the bytes before the exit marker, which may follow it
//! on the same line. Output is passed on as it arrives, except a tail that could be the
//! beginning of a marker (`@`, `@l`, ...), held until the next bytes settle it. An init that cannot start the command (no disk, a root
//! that is not ext4, a program the image lacks) prints `@lode:TOKEN:error:MESSAGE\n`
//! instead. [`Console`] is the one parser of these bytes: it takes any bytes, holds at most
//! a bounded tail, and never panics.

use std::fmt;

/// The most bytes of console noise kept for an error message.
pub const NOISE_TAIL: usize = 4096;
/// The longest guest error message kept.
pub const MAX_MESSAGE: usize = 1024;

/// A per-run token: 32 lowercase hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A fresh token from the system's random source.
    pub fn random() -> Result<Token, ring::error::Unspecified> {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)?;
        Ok(Token(b.iter().map(|x| format!("{x:02x}")).collect()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A token from text, for tests.
    #[cfg(test)]
    pub(crate) fn from_text(s: &str) -> Token {
        Token(s.to_string())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What the console said, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The command is about to start.
    Started,
    /// Bytes the command printed.
    Output(Vec<u8>),
    /// The command ended with this status.
    Exit(u8),
    /// The guest could not run the command.
    GuestError(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the start marker: noise.
    Boot,
    /// Between the markers: output.
    Running,
    /// After the exit marker or an error marker: nothing more is read.
    Done,
}

/// The parser of one run's console stream.
#[derive(Debug)]
pub struct Console {
    start: Vec<u8>,
    error: Vec<u8>,
    exit: Vec<u8>,
    state: State,
    /// Bytes not yet decided: a possible marker prefix, or an unfinished marker line.
    pending: Vec<u8>,
    /// The last [`NOISE_TAIL`] bytes printed outside the command's output.
    noise: Vec<u8>,
}

impl Console {
    /// A parser for the run with `token`.
    pub fn new(token: &Token) -> Console {
        let t = token.as_str();
        Console {
            start: format!("@lode:{t}:start\n").into_bytes(),
            error: format!("@lode:{t}:error:").into_bytes(),
            exit: format!("@lode:{t}:exit:").into_bytes(),
            state: State::Boot,
            pending: Vec::new(),
            noise: Vec::new(),
        }
    }

    /// The last bytes of console output that were not the command's (for error messages).
    pub fn noise(&self) -> String {
        String::from_utf8_lossy(&self.noise).into_owned()
    }

    /// Whether the exit marker or an error marker has been read.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    fn keep_noise(&mut self, b: &[u8]) {
        self.noise.extend_from_slice(b);
        if self.noise.len() > NOISE_TAIL {
            let cut = self.noise.len() - NOISE_TAIL;
            self.noise.drain(..cut);
        }
    }

    /// Feeds bytes read from the console; returns what they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if self.state == State::Done {
            return events;
        }
        self.pending.extend_from_slice(bytes);
        loop {
            let progressed = match self.state {
                State::Boot => self.boot(&mut events),
                State::Running => self.running(&mut events),
                State::Done => false,
            };
            if !progressed {
                return events;
            }
        }
    }

    /// In the noise: looks for the start or an error marker. True when the state moved.
    fn boot(&mut self, events: &mut Vec<Event>) -> bool {
        let start = find(&self.pending, &self.start);
        let error = find(&self.pending, &self.error);
        match (start, error) {
            (Some(s), e) if e.is_none_or(|e| s < e) => {
                let noise: Vec<u8> = self.pending.drain(..s + self.start.len()).collect();
                self.keep_noise(&noise[..s]);
                self.state = State::Running;
                events.push(Event::Started);
                true
            }
            (_, Some(e)) => self.error_line(e, events),
            _ => {
                // Keep only what may still be the beginning of a marker.
                let keep = self.start.len().max(self.error.len());
                if self.pending.len() > keep {
                    let cut = self.pending.len() - keep;
                    let noise: Vec<u8> = self.pending.drain(..cut).collect();
                    self.keep_noise(&noise);
                }
                false
            }
        }
    }

    /// An error marker at `at`: waits for its line, or takes [`MAX_MESSAGE`] bytes of it.
    fn error_line(&mut self, at: usize, events: &mut Vec<Event>) -> bool {
        let body = at + self.error.len();
        let rest = &self.pending[body..];
        let line = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => &rest[..n.min(MAX_MESSAGE)],
            None if rest.len() >= MAX_MESSAGE => &rest[..MAX_MESSAGE],
            None => return false,
        };
        let message = String::from_utf8_lossy(line).trim_end().to_string();
        let noise: Vec<u8> = self.pending[..at].to_vec();
        self.keep_noise(&noise);
        self.pending.clear();
        self.state = State::Done;
        events.push(Event::GuestError(message));
        true
    }

    /// In the command's output: passes bytes on until the exit marker.
    fn running(&mut self, events: &mut Vec<Event>) -> bool {
        if let Some(at) = find(&self.pending, &self.exit) {
            let body = at + self.exit.len();
            let rest = &self.pending[body..];
            let Some(n) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > 3 {
                    // More than three digits: not a status the init writes.
                    return self.bad_status(at, events);
                }
                self.flush_output(at, events);
                return false;
            };
            let Some(status) = parse_status(&rest[..n]) else {
                return self.bad_status(at, events);
            };
            self.flush_output(at, events);
            self.pending.clear();
            self.state = State::Done;
            events.push(Event::Exit(status));
            return true;
        }
        // Everything but a possible beginning of the marker is output.
        let keep = partial_suffix(&self.pending, &self.exit);
        let cut = self.pending.len() - keep;
        self.flush_output(cut, events);
        false
    }

    fn flush_output(&mut self, upto: usize, events: &mut Vec<Event>) {
        if upto > 0 {
            events.push(Event::Output(self.pending.drain(..upto).collect()));
        }
    }

    fn bad_status(&mut self, at: usize, events: &mut Vec<Event>) -> bool {
        self.flush_output(at, events);
        self.pending.clear();
        self.state = State::Done;
        events.push(Event::GuestError(
            "the exit marker carries no status from 0 to 255".into(),
        ));
        true
    }
}

/// A status of one to three decimal digits, at most 255.
fn parse_status(b: &[u8]) -> Option<u8> {
    if b.is_empty() || b.len() > 3 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The length of the longest suffix of `hay` that is a proper prefix of `needle`.
fn partial_suffix(hay: &[u8], needle: &[u8]) -> usize {
    (1..needle.len().min(hay.len() + 1))
        .rev()
        .find(|&n| hay[hay.len() - n..] == needle[..n])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "0123456789abcdef0123456789abcdef";

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Vec<Event>) {
        let mut c = Console::new(&Token::from_text(T));
        let mut out = Vec::new();
        let mut other = Vec::new();
        for ch in chunks {
            for e in c.feed(ch) {
                match e {
                    Event::Output(b) => out.extend(b),
                    e => other.push(e),
                }
            }
        }
        (out, other)
    }

    fn stream(output: &[u8], status: u8) -> Vec<u8> {
        let mut s = b"\x1b[2JSeaBIOS\r\nBooting from ROM...\n".to_vec();
        s.extend_from_slice(format!("@lode:{T}:start\n").as_bytes());
        s.extend_from_slice(output);
        s.extend_from_slice(format!("@lode:{T}:exit:{status}\n").as_bytes());
        s.extend_from_slice(b"reboot: Power down\n");
        s
    }

    #[test]
    fn output_and_status_come_out_of_the_noise() {
        let (out, ev) = run(&[&stream(b"hi\n", 7)]);
        assert_eq!(out, b"hi\n");
        assert_eq!(ev, [Event::Started, Event::Exit(7)]);
    }

    #[test]
    fn output_is_passed_on_at_once_but_a_marker_prefix() {
        let mut c = Console::new(&Token::from_text(T));
        assert_eq!(
            c.feed(format!("noise@lode:{T}:start\ngo\n").as_bytes()),
            [Event::Started, Event::Output(b"go\n".to_vec())]
        );
        assert_eq!(c.feed(b"mail me@"), [Event::Output(b"mail me".to_vec())]);
        assert_eq!(c.feed(b"x.org\n"), [Event::Output(b"@x.org\n".to_vec())]);
    }

    #[test]
    fn a_marker_with_another_token_is_output() {
        let fake = b"\n@lode:ffffffffffffffffffffffffffffffff:exit:0\n";
        let (out, ev) = run(&[&stream(fake, 3)]);
        assert_eq!(out, fake);
        assert_eq!(ev, [Event::Started, Event::Exit(3)]);
    }

    #[test]
    fn guest_errors_are_reported_with_the_noise_before_them() {
        let mut c = Console::new(&Token::from_text(T));
        let ev = c.feed(
            format!("mount: invalid argument\n@lode:{T}:error:mounting /dev/vda failed\nmore")
                .as_bytes(),
        );
        assert_eq!(ev, [Event::GuestError("mounting /dev/vda failed".into())]);
        assert_eq!(c.noise(), "mount: invalid argument\n");
        assert!(c.done());
        assert!(c.feed(b"anything").is_empty());
    }

    #[test]
    fn bad_statuses_are_errors_not_numbers() {
        for bad in ["256", "-1", "", "12a", "9999"] {
            let s = format!("@lode:{T}:start\nx@lode:{T}:exit:{bad}\n");
            let (out, ev) = run(&[s.as_bytes()]);
            assert_eq!(out, b"x", "{bad}");
            assert!(
                matches!(ev.as_slice(), [Event::Started, Event::GuestError(_)]),
                "{bad}: {ev:?}"
            );
        }
    }

    #[test]
    fn noise_is_bounded() {
        let mut c = Console::new(&Token::from_text(T));
        for _ in 0..100 {
            assert!(c.feed(&[b'x'; 1000]).is_empty());
        }
        assert!(c.noise.len() <= NOISE_TAIL && c.pending.len() <= 64);
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..10)) {
            let mut c = Console::new(&Token::from_text(T));
            for ch in &chunks {
                let _ = c.feed(ch);
            }
        }

        #[test]
        fn output_is_exact_however_it_is_split(
            output in proptest::collection::vec(any::<u8>(), 0..400),
            status in any::<u8>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let s = stream(&output, status);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(s.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for a in at {
                chunks.push(&s[prev..a]);
                prev = a;
            }
            chunks.push(&s[prev..]);
            let (out, ev) = run(&chunks);
            prop_assert_eq!(out, output);
            prop_assert_eq!(ev, vec![Event::Started, Event::Exit(status)]);
        }
    }
}
