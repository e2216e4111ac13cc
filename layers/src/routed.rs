//! What the routing layers need from a request and from an answer, so that one layer works over
//! `http` types and over a request type of your own.
//!
//! [`AdmissionLayer`](crate::admission::AdmissionLayer),
//! [`TimeoutWaitLayer`](crate::timeout_wait::TimeoutWaitLayer) and
//! [`CachedSelectLayer`](crate::cached_select::CachedSelectLayer) never read a body. They read
//! the request's [`RequestInfo`], take, keep or move its [`SelectedNode`] slot, and answer some
//! requests themselves with an error. [`Routed`] is that surface on the request;
//! [`RoutedResponse`] is the answer's: pass the inner service's answer on, or make a rejection.
//!
//! `http::Request<B>` and `http::Response<B>` implement both with extensions and a
//! [`ResponseBody`] wrapper, which is what the layers have always done. A request type that
//! keeps these as typed fields implements them without a type map: its answer can be its own
//! rejection, with no wrapper at all.
//!
//! ```
//! use layers::{ErrorFormat, RequestInfo, Routed, SelectedNode};
//!
//! /// A request that carries routing state in fields rather than extensions.
//! struct Job {
//!     info: Option<RequestInfo>,
//!     slot: Option<SelectedNode>,
//! }
//!
//! impl Routed for Job {
//!     fn request_info(&self) -> Option<&RequestInfo> {
//!         self.info.as_ref()
//!     }
//!     fn selected_node(&self) -> Option<&SelectedNode> {
//!         self.slot.as_ref()
//!     }
//!     fn selected_node_mut(&mut self) -> Option<&mut SelectedNode> {
//!         self.slot.as_mut()
//!     }
//!     fn insert_selected_node(&mut self, selected: SelectedNode) {
//!         self.slot = Some(selected);
//!     }
//!     fn remove_selected_node(&mut self) -> Option<SelectedNode> {
//!         self.slot.take()
//!     }
//!     fn error_format(&self) -> ErrorFormat {
//!         ErrorFormat::OpenAi
//!     }
//! }
//! # let job = Job { info: None, slot: None };
//! # assert!(job.model().is_none());
//! ```

use std::sync::Arc;

use http::{Request, Response};

use crate::body::ResponseBody;
use crate::error::{ErrorFormat, RouterError};
use crate::pool::SelectedNode;
use crate::request_info::RequestInfo;

/// A request the routing layers can route: its parsed info, its node slot, and how to reject it.
pub trait Routed {
    /// What [`RequestInfoLayer`](crate::request_info::RequestInfoLayer) (or your own parser)
    /// learned from the body; `None` before it ran.
    fn request_info(&self) -> Option<&RequestInfo>;

    /// The slot an earlier layer took, if any.
    fn selected_node(&self) -> Option<&SelectedNode>;

    /// The slot an earlier layer took, to be moved in place.
    fn selected_node_mut(&mut self) -> Option<&mut SelectedNode>;

    /// Attaches a slot, replacing (and so giving back) any slot held before.
    fn insert_selected_node(&mut self, selected: SelectedNode);

    /// Takes the slot off the request.
    fn remove_selected_node(&mut self) -> Option<SelectedNode>;

    /// How a rejection of this request is written.
    fn error_format(&self) -> ErrorFormat;

    /// The requested model, if the info names one.
    fn model(&self) -> Option<Arc<str>> {
        self.request_info().and_then(|info| info.model.clone())
    }
}

impl<B> Routed for Request<B> {
    fn request_info(&self) -> Option<&RequestInfo> {
        self.extensions().get()
    }

    fn selected_node(&self) -> Option<&SelectedNode> {
        self.extensions().get()
    }

    fn selected_node_mut(&mut self) -> Option<&mut SelectedNode> {
        self.extensions_mut().get_mut()
    }

    fn insert_selected_node(&mut self, selected: SelectedNode) {
        self.extensions_mut().insert(selected);
    }

    fn remove_selected_node(&mut self) -> Option<SelectedNode> {
        self.extensions_mut().remove()
    }

    fn error_format(&self) -> ErrorFormat {
        ErrorFormat::of(self.headers())
    }
}

/// The answer side of [`Routed`]: what a layer answers with, given the inner service's answer
/// or an error of its own.
pub trait RoutedResponse {
    /// The layer's answer: the inner answer, or the layer's rejection. For `http::Response<B>`
    /// that is `Response<ResponseBody<B>>`, whose body is either.
    type Layered;

    /// Passes the inner service's answer on.
    fn pass(self) -> Self::Layered;

    /// The layer's own answer for `error`, written in `format`.
    fn rejection(error: RouterError, format: ErrorFormat) -> Self::Layered;

    /// Passes the inner service's answer on with what the request asked for attached, for the
    /// layers outside it (logs, history), as [`RequestInfoLayer`](crate::RequestInfoLayer)
    /// does. By default, as [`pass`](Self::pass).
    fn pass_with_info(self, info: RequestInfo) -> Self::Layered
    where
        Self: Sized,
    {
        let _ = info;
        self.pass()
    }
}

impl<B> RoutedResponse for Response<B> {
    type Layered = Response<ResponseBody<B>>;

    fn pass(self) -> Self::Layered {
        self.map(ResponseBody::inner)
    }

    fn rejection(error: RouterError, format: ErrorFormat) -> Self::Layered {
        error.into_response_as(format)
    }

    fn pass_with_info(mut self, info: RequestInfo) -> Self::Layered {
        self.extensions_mut().insert(info);
        self.pass()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::BodyExt;

    use crate::pool::{NodePool, NodeSpec};

    use super::*;

    #[test]
    fn an_http_request_keeps_routing_state_in_its_extensions() {
        let pool = NodePool::from_specs([NodeSpec::new("a", "http://127.0.0.1:1")
            .models(["m"])
            .max_concurrency(2)])
        .unwrap();
        let mut request = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        assert_eq!(request.model(), None);
        assert_eq!(request.error_format(), ErrorFormat::Grpc);
        request.extensions_mut().insert(RequestInfo {
            model: Some(Arc::from("m")),
            stream: false,
        });
        assert_eq!(request.model().as_deref(), Some("m"));

        let selected = SelectedNode::new(pool.try_acquire_free(Some("m")).unwrap()).unwrap();
        request.insert_selected_node(selected);
        assert_eq!(pool.load().in_use, 1);
        assert!(request.selected_node().is_some());
        assert!(request.selected_node_mut().is_some());
        let removed = request.remove_selected_node();
        assert!(removed.is_some() && request.selected_node().is_none());
        drop(removed);
        assert_eq!(
            pool.load().in_use,
            0,
            "the removed slot is given back once dropped"
        );
    }

    #[tokio::test]
    async fn an_http_answer_is_passed_on_or_replaced_by_a_rejection() {
        let passed = Response::new(http_body_util::Full::new(Bytes::from_static(b"ok"))).pass();
        assert_eq!(passed.status(), StatusCode::OK);
        assert_eq!(passed.into_body().collect().await.unwrap().to_bytes(), "ok");

        let rejected = <Response<http_body_util::Full<Bytes>>>::rejection(
            RouterError::ModelNotFound("m".into()),
            ErrorFormat::OpenAi,
        );
        assert_eq!(rejected.status(), StatusCode::NOT_FOUND);
        let body = rejected.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{\"error\""), "{body:?}");
    }
}
