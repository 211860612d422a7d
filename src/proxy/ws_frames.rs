//! Just enough of the WebSocket framing (RFC 6455 §5.2) to know where frames
//! end in the guest → client direction, so a close frame can be put between two.

/// A server's close frame, status 1001 "going away" (unmasked, as servers send).
pub const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

#[derive(Default)]
pub struct Tracker {
    /// Header bytes of the frame being read (at most 14).
    head: Vec<u8>,
    /// Payload bytes left in the current frame.
    payload_left: u64,
    /// The stream stopped looking like WebSocket frames.
    lost: bool,
}

impl Tracker {
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.head.is_empty() && self.payload_left == 0
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.payload_left > 0 {
                let take = self.payload_left.min(data.len() as u64);
                self.payload_left -= take;
                data = &data[take as usize..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if let Some(len) = self.header_complete() {
                self.payload_left = len;
                self.head.clear();
            }
        }
    }

    /// The payload length once the whole header has been read.
    fn header_complete(&mut self) -> Option<u64> {
        if self.head.len() < 2 {
            return None;
        }
        let masked = self.head[1] & 0x80 != 0;
        let len7 = (self.head[1] & 0x7f) as u64;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if self.head.len() < need {
            return None;
        }
        let len = match ext {
            0 => len7,
            2 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
            _ => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
        };
        if len > (1 << 62) {
            self.lost = true;
        }
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        if payload_len < 126 {
            f.push(payload_len as u8);
        } else if payload_len < 65536 {
            f.push(126);
            f.extend_from_slice(&(payload_len as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn boundaries_are_found_across_any_split() {
        let mut all = Vec::new();
        for n in [0, 5, 125, 126, 300, 70000] {
            all.extend(frame(n));
        }
        for split in [1, 3, 100, 4096, all.len()] {
            let mut t = Tracker::default();
            for part in all.chunks(split) {
                t.feed(part);
            }
            assert!(t.at_boundary(), "split {split}");
        }
        let mut t = Tracker::default();
        t.feed(&all[..all.len() - 1]);
        assert!(!t.at_boundary());
        let mut t = Tracker::default();
        t.feed(&frame(300)[..3]);
        assert!(!t.at_boundary());
    }
}
