//! Runs the store conformance suite against [`PostgresStore`], one test per check (and
//! once through `run_all`), each on a fresh task hub (schema) of the database named by
//! `KEEL_TEST_POSTGRES_URL`; without it, every test prints that it was skipped.

mod common;

use keel_postgres::PostgresStore;
use keel_store::conformance;

macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let Some(url) = common::postgres_url(stringify!($check)) else { return };
                let store = common::fresh_store(&url).await;
                conformance::$check(&store).await;
                store.delete_task_hub().await.expect("the hub is deleted");
            }
        )*

        #[test]
        fn every_conformance_check_runs() {
            assert_eq!(
                &[$(stringify!($check)),*][..],
                conformance::CHECK_NAMES,
                "this list must name every check of the suite, in order"
            );
        }
    };
}

conformance_tests!(
    create_and_get,
    create_refuses_a_live_duplicate,
    create_replaces_a_terminal_instance,
    enqueue_checks_the_target,
    fetch_leases_an_instance,
    fetch_respects_max_and_arrival_order,
    commit_applies_everything_at_once,
    future_messages_wait_until_visible,
    activities_are_leased_and_completed,
    activity_leases_expire_renew_and_abandon,
    abandoned_orchestrations_come_back,
    replace_history_starts_a_new_execution,
    new_instances_create_children_once,
    messages_to_unknown_instances_are_dropped,
    queries_filter_instances,
    queries_page_through_every_instance_once,
    purge_instance_removes_everything,
    purge_instances_by_filter,
    a_stale_commit_fails_alone_in_a_batch,
    oversized_payloads_are_refused,
    a_rewind_makes_a_failed_instance_pending,
    orchestration_leases_can_be_renewed,
);

#[tokio::test]
async fn run_all_passes() {
    let Some(url) = common::postgres_url("run_all_passes") else { return };
    let schemas = std::sync::Mutex::new(Vec::new());
    conformance::run_all(|| {
        let schema = common::fresh_schema("keel_test");
        schemas.lock().unwrap().push(schema.clone());
        let options = common::hub_options(&url, &schema);
        async move { PostgresStore::open(options).await.expect("the store opens") }
    })
    .await;
    let schemas = schemas.into_inner().unwrap();
    assert_eq!(schemas.len(), conformance::CHECK_NAMES.len(), "a fresh store per check");
    for schema in schemas {
        let store = PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
        store.delete_task_hub().await.expect("the hub is deleted");
    }
}
