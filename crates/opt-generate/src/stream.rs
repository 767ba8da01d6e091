//! Incremental detokenization with stop strings.
//!
//! Byte-level BPE tokens are byte strings: a multi-byte character can be split over several
//! tokens, and a stop string can span several tokens. [`TextStream`] takes each token's bytes
//! and hands out text deltas that are safe to show: complete UTF-8 characters only, and never a
//! suffix that might be the beginning of a stop string (that part is held back until the next
//! token decides it). When a stop string completes, the text is cut just before it.
//!
//! The concatenation of all deltas equals `String::from_utf8_lossy` of all the bytes (what the
//! tokenizer's `decode` returns), truncated at the first stop string.

/// Streaming text of one sequence.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Decoded text: complete characters (invalid sequences already replaced by U+FFFD).
    text: String,
    /// Trailing bytes of an incomplete UTF-8 character (at most 3).
    pending: Vec<u8>,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Default::default() }
    }

    /// All text so far (complete characters), cut at a stop string if one matched.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True once a stop string has matched; further input is ignored.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feed the bytes of the next token. Returns true when this token completed a stop string
    /// (the text is then truncated before the stop string's first occurrence).
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.stopped || bytes.is_empty() {
            return false;
        }
        let before = self.text.len();
        self.pending.extend_from_slice(bytes);
        let pending = std::mem::take(&mut self.pending);
        let mut rest: &[u8] = &pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    self.text.push_str(s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `good` is valid UTF-8 by construction.
                    self.text.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending = bad.to_vec();
                            break;
                        }
                        // An invalid sequence: one U+FFFD, as a lossy decode writes.
                        Some(n) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                    }
                }
            }
        }
        self.check_stop(before)
    }

    /// Look for a stop string that ends in the text added since `before`.
    fn check_stop(&mut self, before: usize) -> bool {
        let mut cut: Option<usize> = None;
        for s in &self.stops {
            // A new match must end after `before`, so it starts after `before - len(s)`.
            let from = floor_char_boundary(&self.text, before.saturating_sub(s.len() - 1));
            if let Some(i) = self.text[from..].find(s.as_str()) {
                let at = from + i;
                cut = Some(cut.map_or(at, |c: usize| c.min(at)));
            }
        }
        match cut {
            Some(at) => {
                self.text.truncate(at);
                self.pending.clear();
                self.stopped = true;
                true
            }
            None => false,
        }
    }

    /// Bytes at the end of the text that could be the start of a stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.text.len());
            for k in (1..=max).rev() {
                let start = self.text.len() - k;
                if self.text.is_char_boundary(start) && s.as_bytes().starts_with(&self.text.as_bytes()[start..]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        hold
    }

    /// The text that became safe to show since the last call.
    pub fn take_delta(&mut self) -> String {
        let end = if self.stopped { self.text.len() } else { self.text.len() - self.held_back() };
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// End of the sequence: the held-back text, with an incomplete trailing character written as
    /// U+FFFD (as a lossy decode of all bytes does).
    pub fn finish(&mut self) -> String {
        if !self.pending.is_empty() {
            self.text.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        let out = self.text[self.emitted.min(self.text.len())..].to_string();
        self.emitted = self.text.len();
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Does `text` contain any of `stops`? Returns the earliest match position.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tokens: &[&[u8]], stops: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut ts = TextStream::new(&stops);
        let mut deltas = Vec::new();
        let mut hit = false;
        for t in tokens {
            hit = ts.push(t);
            deltas.push(ts.take_delta());
            if hit {
                break;
            }
        }
        if !hit {
            deltas.push(ts.finish());
        }
        (deltas, ts.text().to_string(), hit)
    }

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        // "é" = C3 A9, "😀" = F0 9F 98 80 split over tokens.
        let (d, text, _) = run(&[b"a\xC3", b"\xA9b", b"\xF0\x9F", b"\x98", b"\x80!"], &[]);
        assert_eq!(d, vec!["a", "éb", "", "", "😀!", ""]);
        assert_eq!(text, "aéb😀!");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (d, text, _) = run(&[b"x\xFF", b"y\xE2\x82"], &[]);
        assert_eq!(d.concat(), "x\u{FFFD}y\u{FFFD}");
        assert_eq!(text, String::from_utf8_lossy(b"x\xFFy\xE2\x82"));
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_shown() {
        let (d, text, hit) = run(&[b"Hello", b" wor", b"ld\n", b"\nBye"], &["\n\n"]);
        assert!(hit);
        assert_eq!(text, "Hello world");
        assert_eq!(d, vec!["Hello", " wor", "ld", ""]);
        // A prefix of the stop string that turns out not to be one is released.
        let (d, text, hit) = run(&[b"a<", b"/", b"b>", b"c</s", b">tail"], &["</s>"]);
        assert!(hit);
        assert_eq!(text, "a</b>c");
        assert_eq!(d.concat(), "a</b>c");
        assert_eq!(d[0], "a");
        assert_eq!(d[1], "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (_, text, hit) = run(&[b"one two three"], &["three", "two"]);
        assert!(hit);
        assert_eq!(text, "one ");
    }
}
