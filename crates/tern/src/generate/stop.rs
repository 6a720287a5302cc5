//! Stop strings over streamed text: text that might be the start of a stop string is held
//! back until it is known not to be, so a stop string never reaches the caller.

/// Watches streamed text for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds a piece; returns the text safe to emit and whether a stop string was hit (the
    /// stop string and anything after it are dropped).
    pub fn feed(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.pending.push_str(piece);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if tail.len() > hold && s.starts_with(tail) {
                    hold = tail.len();
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases held-back text at the end of the stream.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        assert_eq!(m.feed("Hello"), ("Hello".into(), false));
        assert_eq!(m.feed(" there\nUs"), (" there".into(), false));
        assert_eq!(m.feed("er: hi"), ("".into(), true));
        let mut m = StopMatcher::new(&["ab".to_string()]);
        assert_eq!(m.feed("xa"), ("x".into(), false));
        assert_eq!(m.feed("c"), ("ac".into(), false));
        assert_eq!(m.feed("a"), ("".into(), false));
        assert_eq!(m.flush(), "a");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.feed("abc"), ("abc".into(), false));
    }
}
