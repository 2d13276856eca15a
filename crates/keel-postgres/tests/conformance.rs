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
    };
}

keel_store::for_each_check!(conformance_tests);

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
