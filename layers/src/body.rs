//! [`ResponseBody`]: the inner service's body, or a rejection a layer answered with.
//!
//! Layers that never read the body stay generic over it: their response body is the inner body
//! wrapped in this type, which adds one case for the layer's own JSON error. It works with any
//! `http_body::Body` whose data is `Bytes`: axum's, tonic's, hyper's or your own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The inner service's body, or a complete body a layer answered with.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { bytes: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// The inner service's body, or the bytes of the layer's own answer: for a caller that
    /// erases body types and would rather not box an already boxed body again.
    pub fn into_inner(self) -> Result<B, Bytes> {
        match self.kind {
            Kind::Inner { body } => Ok(body),
            Kind::Full { bytes } => Err(bytes.unwrap_or_default()),
        }
    }
}

impl<B> From<Bytes> for ResponseBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full { bytes: Some(bytes) },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

pin_project! {
    /// Reads a whole body into one [`Bytes`]. A body of one data frame, as most request bodies
    /// are, is handed over as it came; only a body of several frames is copied together.
    /// `http_body_util`'s `collect` keeps every frame in a queue it allocates, even the one.
    pub(crate) struct CollectBytes<B> {
        #[pin]
        body: B,
        first: Option<Bytes>,
        rest: Option<BytesMut>,
    }
}

impl<B> CollectBytes<B> {
    pub(crate) fn new(body: B) -> Self {
        Self {
            body,
            first: None,
            rest: None,
        }
    }
}

impl<B> Future for CollectBytes<B>
where
    B: Body,
{
    type Output = Result<Bytes, B::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(frame) = ready!(this.body.as_mut().poll_frame(cx)?) else {
                // Once there is a `rest`, `first` is in it.
                let bytes = match this.rest.take() {
                    Some(rest) => rest.freeze(),
                    None => this.first.take().unwrap_or_default(),
                };
                return Poll::Ready(Ok(bytes));
            };
            // Trailers are not part of the bytes.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let data = data.copy_to_bytes(data.remaining());
            if let Some(rest) = this.rest.as_mut() {
                rest.extend_from_slice(&data);
            } else if let Some(first) = this.first.take() {
                let mut rest = BytesMut::with_capacity(first.len() + data.len());
                rest.extend_from_slice(&first);
                rest.extend_from_slice(&data);
                *this.rest = Some(rest);
            } else {
                *this.first = Some(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::Full;

    /// A body that hands out `parts` in turn.
    struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, &'static str>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn frames(parts: Vec<Result<Frame<Bytes>, &'static str>>) -> Frames {
        Frames(parts.into())
    }

    #[tokio::test]
    async fn a_body_of_one_frame_is_handed_over_without_a_copy() {
        let sent = Bytes::from_static(b"{\"model\":\"m\"}");
        let got = CollectBytes::new(Full::new(sent.clone())).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(got.as_ptr(), sent.as_ptr(), "the same bytes, not a copy");
    }

    #[tokio::test]
    async fn several_frames_are_joined_and_trailers_left_out() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
            Ok(Frame::trailers(HeaderMap::new())),
            Ok(Frame::data(Bytes::from_static(b"e"))),
        ]);
        assert_eq!(CollectBytes::new(body).await.unwrap(), "abcde");
        assert_eq!(CollectBytes::new(frames(vec![])).await.unwrap(), "");
    }

    #[tokio::test]
    async fn a_failing_body_fails_the_collection() {
        let body = frames(vec![Ok(Frame::data(Bytes::from_static(b"ab"))), Err("cut")]);
        assert_eq!(CollectBytes::new(body).await, Err("cut"));
    }
}
