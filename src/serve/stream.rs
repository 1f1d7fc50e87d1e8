//! A completion as server-sent events, and the incremental UTF-8 decoding they need.
//!
//! The model draws bytes, and one byte is often only part of a character: the decoder holds an
//! incomplete sequence until the bytes that finish it arrive, and writes U+FFFD for bytes that can
//! never be UTF-8, with the same rule as `String::from_utf8_lossy`, so that the streamed text,
//! joined, equals the lossy decoding of the whole output. Each event also carries its raw bytes.

use super::scheduler::{Event, Finished};
use hyper::body::{Body, Bytes, Frame};
use serde_json::json;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Turns bytes into text as they come, holding an incomplete character for later.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    held: Vec<u8>,
}

impl Utf8Decoder {
    /// The text that `bytes` complete (with what was held before).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.held.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.held;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The prefix is valid by construction.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An incomplete character at the end: wait for its other bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.held.len() - keep;
        self.held.drain(..start);
        out
    }

    /// The end of the bytes: an incomplete character left becomes one U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.held.is_empty() {
            String::new()
        } else {
            self.held.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// The JSON of the last event of a stream, and of the statistics in a whole response.
pub fn finished_json(f: &Finished) -> serde_json::Value {
    json!({
        "finish_reason": "length",
        "prompt_bytes": f.prompt_bytes,
        "generated_bytes": f.generated_bytes,
        "queued_ms": f.queued.as_secs_f64() * 1e3,
        "generation_ms": f.generating.as_secs_f64() * 1e3,
    })
}

fn event(name: Option<&str>, data: &serde_json::Value) -> Bytes {
    let head = name.map(|n| format!("event: {n}\n")).unwrap_or_default();
    Bytes::from(format!("{head}data: {data}\n\n"))
}

/// The response body of a streamed completion: one `data:` event per group of bytes the decoder
/// thread sent (`{"text": ..., "bytes": [...]}`), then `event: done` with the counts and timing, or
/// `event: error` with a message. Dropping it (the client went away) closes the channel, which the
/// decoder thread sees and cancels the sequence.
pub struct SseBody {
    events: mpsc::Receiver<Event>,
    utf8: Utf8Decoder,
    ended: bool,
}

impl SseBody {
    /// A body reading the events of one request.
    pub fn new(events: mpsc::Receiver<Event>) -> Self {
        SseBody {
            events,
            utf8: Utf8Decoder::default(),
            ended: false,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match self.events.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Event::Bytes(bytes))) => {
                let text = self.utf8.push(&bytes);
                event(None, &json!({ "text": text, "bytes": bytes }))
            }
            Poll::Ready(Some(Event::Done(f))) => {
                self.ended = true;
                let tail = self.utf8.finish();
                let mut out = Vec::new();
                if !tail.is_empty() {
                    out.extend_from_slice(&event(None, &json!({ "text": tail, "bytes": [] })));
                }
                out.extend_from_slice(&event(Some("done"), &finished_json(&f)));
                Bytes::from(out)
            }
            Poll::Ready(Some(Event::Failed(failure))) => {
                self.ended = true;
                event(Some("error"), &json!({ "error": failure.message }))
            }
            Poll::Ready(None) => {
                self.ended = true;
                event(Some("error"), &json!({ "error": "generation stopped unexpectedly" }))
            }
        };
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `bytes` in pieces of `n` and join the text.
    fn decode(bytes: &[u8], n: usize) -> String {
        let mut d = Utf8Decoder::default();
        let mut out: String = bytes.chunks(n).map(|c| d.push(c)).collect();
        out.push_str(&d.finish());
        out
    }

    #[test]
    fn the_joined_text_is_the_lossy_decoding_of_the_whole() {
        let cases: [&[u8]; 7] = [
            "héllo wörld ✓ 🎉".as_bytes(),
            b"\xff\xfeab",
            b"a\xe2\x82",             // incomplete at the end
            b"\xe2\x82a\xe2\x82\xac", // broken, then whole
            b"\xf0\x9f\x8e",
            b"\xed\xa0\x80x", // a surrogate: invalid
            b"",
        ];
        for bytes in cases {
            for n in 1..=4 {
                assert_eq!(
                    decode(bytes, n),
                    String::from_utf8_lossy(bytes),
                    "{bytes:?} in pieces of {n}"
                );
            }
        }
    }

    #[test]
    fn a_character_split_across_pushes_waits_for_its_last_byte() {
        let mut d = Utf8Decoder::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push(&euro[..1]), "");
        assert_eq!(d.push(&euro[1..2]), "");
        assert_eq!(d.push(&euro[2..]), "€");
        assert_eq!(d.finish(), "");
    }
}
