//! A compromised coordinator choosing who sums: subsets of the nodes, a
//! faked dropout, a session among fewer, different key sets relayed to a
//! session's members, and the evaluation limit.

use super::harness::Compromised;
use super::*;

/// Issue 38 (4): a coordinator that runs one quantity over {A, B}, {A, C}
/// and {B, C}, claims a node dropped out to unmask the rest, or opens a
/// session among fewer nodes, to solve for one hospital's values, is
/// refused by the nodes, even nodes that accept sums over two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cannot_choose_who_sums_a_study_to_isolate_a_hospital() {
    let (federation, _dir) = start_with(PATIENTS, 2).await;
    let attacker = Compromised::new(&federation).await;
    let (a, b, c) = (attacker.id(0), attacker.id(1), attacker.id(2));
    let refused = |err: tonic::Status, says: &str| {
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            err.message()
        );
        assert!(err.message().contains(says), "{}", err.message());
    };

    // A round that fewer than all its nodes could unmask: some would
    // never bind the study (unmasking at the others only).
    let mut partial = attacker.advertise(
        "subset/partial",
        &[a.clone(), b.clone(), c.clone()],
        Phase::Evaluate,
    );
    partial.params.as_mut().unwrap().threshold = 2;
    let err = attacker
        .client(0)
        .await
        .round_advertise(partial)
        .await
        .unwrap_err();
    refused(
        err,
        "this node takes part only in rounds that need every node's",
    );
    // Three subsets of one quantity (a validation of one model). {A, B}: a
    // whole round, unmasked, so the study is bound to the two at both.
    let mut ab = attacker.masked_validation("subset/ab", &[0, 1]).await;
    for client in &mut ab {
        client
            .round_unmask(pb::RoundUnmaskRequest {
                round: "subset/ab".to_owned(),
                survivors: vec![a.clone(), b.clone()],
            })
            .await
            .unwrap();
    }
    // Each node's audit log says over which nodes it was asked to sum.
    let admitted = format!("round subset/ab: admitted over [{a}, {b}]");
    for node in &federation.nodes[..2] {
        let entries = node.store.audit_entries().unwrap();
        assert!(
            entries.iter().any(|e| e.reason.starts_with(&admitted)),
            "{}",
            node.profile.id
        );
    }
    // {A, C} and {B, C}: refused at step 1 by A and by B, before anything
    // is computed: the sums that would isolate C (and A, and B) never exist.
    let bound = format!("the study are over [{a}, {b}]");
    for (index, pair) in [(0, [a.clone(), c.clone()]), (1, [b.clone(), c.clone()])] {
        let round = format!("subset/{}", pair.join("-"));
        let err = attacker
            .client(index)
            .await
            .round_advertise(attacker.advertise(&round, &pair, Phase::Evaluate))
            .await
            .unwrap_err();
        refused(err, &bound);
    }
    // A node certificate made up by whoever runs the CA is not a member.
    let made_up = [c.clone(), "madeup".to_owned()];
    let err = attacker
        .client(2)
        .await
        .round_advertise(attacker.advertise("subset/madeup", &made_up, Phase::Evaluate))
        .await
        .unwrap_err();
    refused(
        err,
        "names `madeup`, which is not one of this node's federation members",
    );

    // Another study: a round over all three, unmasked. In a second one,
    // every input sent, claiming that C dropped out to unmask A and B's sum
    // is refused (and ends the round at the node that refused).
    let attacker = Compromised::new(&federation).await;
    let all = [a.clone(), b.clone(), c.clone()];
    let unmask = |round: &str, survivors: &[String]| pb::RoundUnmaskRequest {
        round: round.to_owned(),
        survivors: survivors.to_vec(),
    };
    for mut client in attacker.masked_validation("drop/abc", &[0, 1, 2]).await {
        client.round_unmask(unmask("drop/abc", &all)).await.unwrap();
    }
    let mut again = attacker.masked_validation("drop/again", &[0, 1, 2]).await;
    for client in &mut again[..2] {
        let err = client
            .round_unmask(unmask("drop/again", &[a.clone(), b.clone()]))
            .await
            .unwrap_err();
        refused(
            err,
            &format!("unmasking for [{a}, {b}] rather than every node"),
        );
        let err = client
            .round_unmask(unmask("drop/again", &all))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    }
    // Re-keying among the two that are left, for the same values or any
    // other of the study's: refused at opening.
    for index in [0, 1] {
        let err = attacker
            .client(index)
            .await
            .session_open(attacker.advertise("drop/session", &[a.clone(), b.clone()], Phase::Train))
            .await
            .unwrap_err();
        refused(err, &format!("the study are over [{a}, {b}, {c}]"));
    }

    // Issue 38 (4)(c): a coordinator relaying different key sets to
    // different members of a session (B keyed over {A, B}, A and C over
    // all three) gets no masked input from any: each masks only once every
    // other member's confirmation verifies over the keys it agreed itself.
    let attacker = Compromised::new(&federation).await;
    let split = "split/session";
    let mut clients = Vec::new();
    for index in 0..3 {
        clients.push(attacker.client(index).await);
    }
    let sets = [all.to_vec(), vec![a.clone(), b.clone()], all.to_vec()];
    let mut keys = Vec::new();
    for (client, set) in clients.iter_mut().zip(&sets) {
        let opened = client
            .session_open(attacker.advertise(split, set, Phase::Train))
            .await
            .unwrap()
            .into_inner();
        keys.push(opened.keys.unwrap());
    }
    let mut confirmations = Vec::new();
    for (index, client) in clients.iter_mut().enumerate() {
        let relayed = if index == 1 {
            keys[..2].to_vec()
        } else {
            keys.clone()
        };
        let agreed = client
            .session_agree(pb::SessionAgreeRequest {
                session: split.to_owned(),
                keys: relayed,
            })
            .await
            .unwrap()
            .into_inner();
        confirmations.push(pb::SessionConfirmation {
            node: attacker.id(index),
            signature: agreed.confirmation,
        });
    }
    // A and C find that B did not confirm their keys, B that A did not.
    for (client, unconfirmed) in clients.iter_mut().zip([&b, &a, &b]) {
        let err = client
            .session_input(pb::SessionInputRequest {
                session: split.to_owned(),
                round: 0,
                model_json: Vec::new(),
                previous: None,
                confirmations: confirmations.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains(&format!(
                "{unconfirmed} did not confirm the keys this node agreed"
            )),
            "{}",
            err.message()
        );
    }

    // Issue 38 (3): each evaluation scores the held-out patients with a
    // model someone chose; a study has a limited number at each node.
    let attacker = Compromised::new(&federation).await;
    let mut client = attacker.client(0).await;
    let limit = ghx_node::config::DEFAULT_MAX_EVALUATIONS;
    for n in 0..limit {
        let round = format!("evaluate/{n}");
        client
            .round_advertise(attacker.advertise(&round, &all, Phase::Evaluate))
            .await
            .unwrap();
    }
    let err = client
        .round_advertise(attacker.advertise("evaluate/more", &all, Phase::Evaluate))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "has had the {limit} model evaluations this node allows"
        )),
        "{}",
        err.message()
    );
    federation.shutdown().await;
}
