//! Bounded-concurrency fan-out shared by discovery and collection.

use std::future::Future;

use tokio::task::JoinSet;

/// Runs `f` on every item with at most `concurrency` (at least 1) futures in flight at once
/// and returns the results in the items' order. A panic in one future is resumed here.
pub async fn bounded_map<T, R, F, Fut>(items: &[T], concurrency: usize, f: F) -> Vec<R>
where
    F: FnMut(&T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    bounded_map_observed(items, concurrency, f, |_, _| {}).await
}

/// [`bounded_map`], calling `done(finished, result)` as each result comes in (in completion
/// order; `finished` counts the results so far, this one included): for progress display.
pub async fn bounded_map_observed<T, R, F, Fut>(
    items: &[T],
    concurrency: usize,
    mut f: F,
    mut done_one: impl FnMut(usize, &R),
) -> Vec<R>
where
    F: FnMut(&T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let limit = concurrency.max(1);
    let mut running = JoinSet::new();
    let mut done: Vec<(usize, R)> = Vec::with_capacity(items.len());
    let mut next = 0;
    while next < items.len() || !running.is_empty() {
        while next < items.len() && running.len() < limit {
            let work = f(&items[next]);
            let index = next;
            running.spawn(async move { (index, work.await) });
            next += 1;
        }
        match running.join_next().await {
            Some(Ok(result)) => {
                done_one(done.len() + 1, &result.1);
                done.push(result);
            }
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Tasks are never cancelled here; `JoinSet` only reports cancellation when
            // aborted or shut down, which this function does not do.
            Some(Err(_)) | None => {}
        }
    }
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn never_more_than_the_limit_in_flight_and_order_kept() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let items: Vec<u64> = (0..40).collect();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            bounded_map(&items, 6, |&i| {
                let in_flight = in_flight.clone();
                let peak = peak.clone();
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    // Later items finish first, so completion order differs from input order.
                    tokio::time::sleep(Duration::from_millis(40 - i)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    i * 10
                }
            }),
        )
        .await
        .expect("bounded_map finished");
        assert_eq!(out, items.iter().map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn every_result_is_observed_once_as_it_comes() {
        let items: Vec<u64> = (0..25).collect();
        let mut seen = Vec::new();
        let out = bounded_map_observed(
            &items,
            4,
            |&i| async move { i * 2 },
            |n, r: &u64| seen.push((n, *r)),
        )
        .await;
        assert_eq!(out.len(), 25);
        let counts: Vec<usize> = seen.iter().map(|(n, _)| *n).collect();
        assert_eq!(counts, (1..=25).collect::<Vec<_>>());
        let mut values: Vec<u64> = seen.iter().map(|(_, r)| *r).collect();
        values.sort_unstable();
        assert_eq!(values, out);
    }

    #[tokio::test]
    async fn zero_concurrency_means_one() {
        let peak = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let out = bounded_map(&[1, 2, 3], 0, |&i| {
            let in_flight = in_flight.clone();
            let peak = peak.clone();
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                i
            }
        })
        .await;
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(peak.load(Ordering::SeqCst), 1);
    }
}
