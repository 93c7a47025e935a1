//! A response body that holds a guard (a call's place in a limit) until the body ends, fails or is dropped,
//! so a streaming call counts for its whole life, not just until its headers.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// `inner`, holding `guard` until it ends or is dropped.
    pub struct HeldBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> HeldBody<B, G> {
    /// `inner` holding `guard` (none: nothing to release).
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Default, G> Default for HeldBody<B, G> {
    fn default() -> Self {
        Self::new(B::default(), None)
    }
}

impl<B: Body, G> Body for HeldBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        // The call is over once its body has ended or failed, even if the server keeps the body a while longer.
        let finished = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
        };
        if finished {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
