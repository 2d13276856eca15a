//! Statements sent together, without waiting for each answer before sending the next
//! (the PostgreSQL protocol's pipelining): one round trip for a group of statements
//! instead of one per statement.
//!
//! The driver sends a statement when its future is first polled; [`Pipeline::run`]
//! polls them in the order they were added, so the server executes them in that order,
//! one after the other, in the connection's transaction. If one fails, the transaction
//! is aborted and the statements after it fail too.

use std::task::Poll;

use futures_util::future::BoxFuture;
use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

/// A group of statements to execute in order.
pub(crate) struct Pipeline<'a> {
    client: &'a Client,
    queued: Vec<BoxFuture<'a, Result<Answer, tokio_postgres::Error>>>,
}

/// What a statement of a pipeline answered.
pub(crate) enum Answer {
    /// Rows changed, or rows returned by a `SELECT` ([`Pipeline::push`]).
    Count(u64),
    /// The rows returned ([`Pipeline::push_query`]).
    Rows(Vec<Row>),
}

impl Answer {
    /// The row count (for [`Pipeline::push_query`], the rows returned).
    pub(crate) fn count(&self) -> u64 {
        match self {
            Answer::Count(count) => *count,
            Answer::Rows(rows) => rows.len() as u64,
        }
    }
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new(client: &'a Client) -> Pipeline<'a> {
        Pipeline { client, queued: Vec::new() }
    }

    /// Adds a statement; returns where its row count will be in [`Pipeline::run`]'s
    /// result (rows changed, or rows returned by a `SELECT`).
    pub(crate) fn push(&mut self, statement: &'a Statement, params: Vec<&'a (dyn ToSql + Sync)>) -> usize {
        let execute = self.client.execute_raw(statement, params);
        self.queued.push(Box::pin(async move { execute.await.map(Answer::Count) }));
        self.queued.len() - 1
    }

    /// Adds a statement whose rows are wanted; returns where they will be in
    /// [`Pipeline::run`]'s result.
    pub(crate) fn push_query(&mut self, statement: &'a Statement, params: Vec<&'a (dyn ToSql + Sync)>) -> usize {
        let query = self.client.query_raw(statement, params);
        self.queued.push(Box::pin(async move { query.await?.try_collect().await.map(Answer::Rows) }));
        self.queued.len() - 1
    }

    /// Sends every statement and waits for all the answers, in order.
    pub(crate) async fn run(self) -> Result<Vec<Answer>, tokio_postgres::Error> {
        let mut queued: Vec<Option<BoxFuture<'a, Result<Answer, tokio_postgres::Error>>>> =
            self.queued.into_iter().map(Some).collect();
        let mut counts: Vec<Option<Answer>> = (0..queued.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut waiting = false;
            for (slot, count) in queued.iter_mut().zip(counts.iter_mut()) {
                let Some(future) = slot else { continue };
                match future.as_mut().poll(cx) {
                    Poll::Ready(Ok(rows)) => {
                        *count = Some(rows);
                        *slot = None;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => waiting = true,
                }
            }
            if waiting {
                Poll::Pending
            } else {
                Poll::Ready(Ok(counts
                    .iter_mut()
                    .map(|count| count.take().expect("every statement answered"))
                    .collect()))
            }
        })
        .await
    }
}
