//! [`ResponseFuture`]: the inner service's answer, or a rejection decided in `call`, for any
//! answer type that is a [`RoutedResponse`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::error::{ErrorFormat, RouterError};
use crate::routed::RoutedResponse;

pin_project! {
    /// Response future of layers that decide at once whether to call the inner service.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F },
        Rejected { error: Option<RouterError>, format: ErrorFormat },
    }
}

impl<F> ResponseFuture<F> {
    /// The inner service was called.
    pub fn called(future: F) -> Self {
        Self {
            kind: Kind::Called { future },
        }
    }

    /// The layer answers with `error`, written in `format`.
    pub fn rejected(error: RouterError, format: ErrorFormat) -> Self {
        Self {
            kind: Kind::Rejected {
                error: Some(error),
                format,
            },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    T: RoutedResponse,
{
    type Output = Result<T::Layered, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.pass()))
            }
            KindProj::Rejected { error, format } => {
                let error = error.take().unwrap_or(RouterError::Internal);
                Poll::Ready(Ok(T::rejection(error, *format)))
            }
        }
    }
}
