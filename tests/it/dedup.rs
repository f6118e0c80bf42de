//! Duplicate suppression: client retries with an Idempotency-Key, and batches the relay
//! retries after a lost ack.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn an_idempotency_key_retry_gets_the_original_answer_and_is_stored_once() {
    let (nats, _setup, relay) = start_relay(|_| {}).await;
    let send = |client: &reqwest::Client| {
        relay.publish(client, "edge.idem", "once").header("Idempotency-Key", "order-42").send()
    };
    let first: Accepted = send(&relay.h1).await.unwrap().json().await.unwrap();
    assert!(!first.duplicate);
    let again = send(&relay.h2).await.unwrap();
    assert_eq!(again.status(), 202);
    let again: Accepted = again.json().await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, again.batch.as_str(), again.index),
        (first.seq, first.batch.as_str(), first.index)
    );

    // Concurrent retries of a new key: one is published, the others wait for its answer.
    let sends = (0..5).map(|_| async {
        let resp = relay.publish_accepted_with_key("edge.idem", "race", "order-43").await;
        resp.json::<Accepted>().await.unwrap()
    });
    let answers = futures::future::join_all(sends).await;
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(answers.iter().all(|a| a.seq == answers[0].seq));

    let stored = read_stream(&nats.url()).await;
    let events: Vec<_> = stored.iter().flat_map(|m| &m.batch.events).collect();
    assert_eq!(events.len(), 2, "each key stored once: {events:?}");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_batch_retried_after_a_lost_ack_is_stored_once() {
    let (nats, _setup, relay) = start_relay(nats_deadlines(200, 8_000)).await;
    // Warm up so the stream exists and the connection is idle.
    assert_eq!(relay.publish(&relay.h2, "edge.retry", "warm").send().await.unwrap().status(), 202);

    // Freeze the server: the publish sits in its socket, the ack does not come, and the relay
    // publishes the batch again (same Msg-Id) every few hundred milliseconds.
    nats.freeze(true);
    let req = relay.publish(&relay.h2, "edge.retry", "retried").send();
    let thaw = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nats.freeze(false);
    };
    let (resp, ()) = tokio::join!(req, thaw);
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 202);
    let ok: Accepted = resp.json().await.unwrap();

    let stored = read_stream(&nats.url()).await;
    let copies = stored
        .iter()
        .flat_map(|m| m.batch.events.iter().map(move |e| (m, e)))
        .filter(|(_, e)| &e.payload[..] == b"retried")
        .count();
    assert_eq!(copies, 1, "the retried batch must be stored once");
    assert!(stored.iter().any(|m| m.seq == ok.seq && m.msg_id == ok.batch));
    relay.shutdown().await;
}

#[tokio::test]
async fn a_jwt_whose_sub_is_a_static_token_s_name_cannot_claim_that_token_s_keys() {
    let idp = TestIdp::start().await;
    let (nats, _setup, relay) = start_jwt_relay(&idp, |_| {}).await;
    // The static token is named `edge-test`; this JWT's `sub` is the same string.
    let jwt = idp
        .token(serde_json::json!({"sub": "edge-test", "tenant": "acme", "scope": "edge:publish"}));
    let send = |token: &str, key: &str| {
        let req = relay.publish_as(&relay.h2, token, "edge.acme.idem", "x");
        let req = req.header("Idempotency-Key", key.to_owned()).send();
        async move {
            let resp = req.await.unwrap();
            assert_eq!(resp.status(), 202);
            resp.json::<Accepted>().await.unwrap()
        }
    };

    // The static token's key first: the JWT's event with the same key is another event.
    let by_static = send(TOKEN, "k-1").await;
    let by_jwt = send(&jwt, "k-1").await;
    assert!(!by_static.duplicate && !by_jwt.duplicate, "{by_static:?} {by_jwt:?}");
    assert_ne!(by_static.seq, by_jwt.seq);
    // And the other way round: a JWT cannot pre-claim the token's next key.
    let by_jwt = send(&jwt, "k-2").await;
    let by_static = send(TOKEN, "k-2").await;
    assert!(!by_jwt.duplicate && !by_static.duplicate, "{by_jwt:?} {by_static:?}");
    assert_ne!(by_static.seq, by_jwt.seq);
    // Within one identity a key is still a key: retries are duplicates.
    assert!(send(TOKEN, "k-1").await.duplicate);
    assert!(send(&jwt, "k-2").await.duplicate);

    // Four events, two from each, each with its own namespaced publisher.
    let stored = read_stream(&nats.url()).await;
    let mut publishers: Vec<String> =
        stored.iter().flat_map(|m| m.batch.events.iter().map(|e| e.publisher.clone())).collect();
    publishers.sort();
    let jwt_name = format!("jwt:{}:edge-test", idp.issuer());
    assert_eq!(
        publishers,
        [jwt_name.clone(), jwt_name, "static:edge-test".into(), "static:edge-test".into()]
    );
}
