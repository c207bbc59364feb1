//! `refsys.referral.v1.EventService`: the outbox as a resumable server stream.
//!
//! Each stream is a task that reads a batch (holding a pooled connection only for that query),
//! pushes it into a bounded channel, and when it has caught up waits for a wake-up from the
//! [`Notifier`] or the fallback poll. A slow consumer therefore holds no connection, and at most
//! [`STREAM_BUFFER`] events wait in memory for it.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use refsys_proto::referral::v1 as pb;
use refsys_proto::referral::v1::event_service_server::EventService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::events::{EventCursor, Notifier, Outbox};

/// Events read per query, and the most a stream buffers for a slow consumer.
pub const STREAM_BUFFER: usize = 128;
/// How often a caught-up stream looks again without a notification.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

pub struct EventHandler {
    outbox: Outbox,
    notifier: Notifier,
}

impl EventHandler {
    pub fn new(outbox: Outbox, notifier: Notifier) -> Self {
        Self { outbox, notifier }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for EventHandler {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let mut cursor = EventCursor::decode(&request.get_ref().after_cursor)?;
        if let Some(cursor) = &cursor {
            self.outbox.check_cursor(cursor).await?;
        }
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let outbox = self.outbox.clone();
        let mut wakes = self.notifier.subscribe();
        tokio::spawn(async move {
            loop {
                // Marked seen before reading, so a notification during the read is not lost.
                wakes.borrow_and_update();
                let batch = match outbox.after(cursor.as_ref(), STREAM_BUFFER as i64).await {
                    Ok(batch) => batch,
                    Err(err) => {
                        let _ = sender.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let caught_up = batch.len() < STREAM_BUFFER;
                for (position, event) in batch {
                    cursor = Some(position);
                    let message = pb::WatchEventsResponse { event: Some(event) };
                    if sender.send(Ok(message)).await.is_err() {
                        return; // the caller went away
                    }
                }
                if caught_up {
                    tokio::select! {
                        changed = wakes.changed() => {
                            if changed.is_err() {
                                // The notifier stopped (shutdown): keep polling slowly.
                                tokio::time::sleep(FALLBACK_POLL).await;
                            }
                        }
                        () = tokio::time::sleep(FALLBACK_POLL) => {}
                        () = sender.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
