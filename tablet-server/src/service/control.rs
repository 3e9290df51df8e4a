//! The group control service: the master's calls that move a tablet between groups
//! (docs/elasticity.md). Answers carry typed `TabletError`s, as the tablet service's do.

use std::sync::Arc;

use luna_proto::group::{self as gpb, group_control_server::GroupControl};
use tonic::{Request, Response, Status};

use crate::hosting::Hosting;

/// The group control service of one server.
pub(crate) struct GroupControlService {
    hosting: Arc<Hosting>,
}

impl GroupControlService {
    pub(crate) fn new(hosting: Arc<Hosting>) -> Self {
        Self { hosting }
    }
}

#[tonic::async_trait]
impl GroupControl for GroupControlService {
    async fn seal_tablet(
        &self,
        request: Request<gpb::SealTabletRequest>,
    ) -> Result<Response<gpb::SealTabletResponse>, Status> {
        let request = request.into_inner();
        let sealed = match self.hosting.leading(request.group_id) {
            Ok(group) if request.cancel => group
                .cancel_seal(request.tablet_id, request.epoch)
                .await
                .map(|()| (None, 0)),
            Ok(group) if request.prepare => group
                .prepare_move(request.tablet_id, request.epoch, request.next_epoch)
                .await
                .map(|flushed_bytes| (None, flushed_bytes)),
            Ok(group) => group
                .seal_for_move(request.tablet_id, request.epoch, request.next_epoch)
                .await
                .map(|(handoff, flushed_bytes)| (Some(handoff), flushed_bytes)),
            Err(error) => Err(error),
        };
        Ok(Response::new(match sealed {
            Ok((handoff, flushed_bytes)) => gpb::SealTabletResponse {
                error: None,
                handoff,
                flushed_bytes,
            },
            Err(error) => gpb::SealTabletResponse {
                error: Some(error.into_reply()?),
                ..Default::default()
            },
        }))
    }

    async fn split_tablet(
        &self,
        request: Request<gpb::SplitTabletRequest>,
    ) -> Result<Response<gpb::SplitTabletResponse>, Status> {
        let request = request.into_inner();
        let (id, epoch, new_id) = (request.tablet_id, request.epoch, request.new_tablet_id);
        let split = match self.hosting.leading(request.group_id) {
            Ok(group) if request.cancel => group.cancel_split(id, epoch, new_id).await,
            Ok(group) => group.split(id, epoch, new_id, request.at).await.map(Some),
            Err(error) => Err(error),
        };
        Ok(Response::new(match split {
            Ok(Some(split)) => gpb::SplitTabletResponse {
                error: None,
                split: true,
                at: split.at,
                flushed_bytes: split.flushed_bytes,
            },
            Ok(None) => gpb::SplitTabletResponse::default(),
            Err(error) => gpb::SplitTabletResponse {
                error: Some(error.into_reply()?),
                ..Default::default()
            },
        }))
    }

    async fn adopt_tablet(
        &self,
        request: Request<gpb::AdoptTabletRequest>,
    ) -> Result<Response<gpb::AdoptTabletResponse>, Status> {
        let request = request.into_inner();
        let adopt = request
            .adopt
            .ok_or_else(|| Status::invalid_argument("the request carries no adoption"))?;
        let adopted = match self.hosting.leading(request.group_id) {
            Ok(group) => group.adopt(adopt).await,
            Err(error) => Err(error),
        };
        Ok(Response::new(gpb::AdoptTabletResponse {
            error: adopted.err().map(|error| error.into_reply()).transpose()?,
        }))
    }
}
