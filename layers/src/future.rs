//! [`ResponseFuture`]: the inner service's response, or a rejection decided in `call`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::error::{ErrorFormat, RouterError};

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

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Rejected { error, format } => {
                let error = error.take().unwrap_or(RouterError::Internal);
                Poll::Ready(Ok(error.into_response_as(*format)))
            }
        }
    }
}
