//! A compromised coordinator against one run's lineage: forged keys and
//! evidence, redos, changed rows, unconfirmed session keys, rounds past
//! the last, the run's evaluation with the wrong evidence, expiry.

use super::harness::{agreed, keyed_session, node_client};
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_round_keys_not_signed_by_the_node_they_name() {
    use ghx_study::capability::{Signer, claims_for};

    // Rounds among two of the hospitals: nodes that accept sums over two.
    let (federation, _dir) = start_with(PATIENTS, 2).await;
    let study_id = federation
        .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();
    // The manifest as the coordinator keeps it (requester filled in).
    let manifest_json = federation
        .client(RESEARCHER)
        .await
        .unwrap()
        .get_study(pb::GetStudyRequest {
            study_id: study_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .manifest_json;
    let manifest = StudyManifest::parse(&manifest_json).unwrap();
    let spec = &manifest.trainings[0];
    let training_json = spec.canonical_json();
    // As if the coordinator host were compromised: its certificate and
    // capability key, driving a round itself.
    let key =
        std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
    let signer = Signer::from_pem(ghx::local_federation::SIGNING_KID, &key).unwrap();
    let nodes = &federation.nodes[..2];
    let ids: Vec<String> = nodes.iter().map(|n| n.profile.id.to_owned()).collect();
    // Capabilities are single-use at each node: one per opening.
    let fresh_token = || {
        signer
            .sign(&claims_for(
                &manifest,
                &study_id,
                ids.clone(),
                &training_json,
                time::Duration::minutes(5),
            ))
            .unwrap()
    };
    let token = fresh_token();
    let round = "attack/validation".to_owned();
    let mut clients = Vec::new();
    let mut advertised = Vec::new();
    // A one-off round over the keys the nodes advertise: an external
    // validation (the moments are a run's round 0 only).
    let one_off = |phase: Phase, round: &str, capability: String| pb::RoundAdvertiseRequest {
        capability,
        manifest_json: manifest_json.clone(),
        training_json: training_json.clone(),
        params: Some(pb::RoundParams {
            round: round.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: phase.len(spec.features.len(), spec.param_count()) as u32,
        }),
        phase: phase.name().to_owned(),
        run: String::new(),
    };
    for (index, node) in nodes.iter().enumerate() {
        let mut client = node_client(&federation, index, "coordinator").await;
        // The moments outside a run, exact and over rows no run is sealed
        // to, are refused.
        let err = client
            .round_advertise(one_off(Phase::Moments, "attack/moments", fresh_token()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("a one-off moments round is refused"),
            "{}",
            err.message()
        );
        let keys = client
            .round_advertise(one_off(Phase::Evaluate, &round, token.clone()))
            .await
            .unwrap()
            .into_inner()
            .keys
            .unwrap();
        assert_eq!(keys.node, node.profile.id);
        assert!(!keys.signature.is_empty() && keys.certificate_pem.contains("CERTIFICATE"));
        clients.push(client);
        advertised.push(keys);
    }
    let share = |keys: Vec<pb::AdvertisedKeys>| pb::RoundShareKeysRequest {
        round: round.clone(),
        advertised: keys,
    };
    // The second node's keys swapped for others under its signature, or
    // vouched for by the first node's certificate: the first node refuses
    // to deal shares, naming whose keys and why.
    let mut swapped = advertised.clone();
    swapped[1].mask_key = advertised[0].mask_key.clone();
    let err = clients[0]
        .round_share_keys(share(swapped))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "round {round}: the keys advertised as {}'s are refused: its signature does not verify",
            ids[1]
        )
    );
    let mut borrowed = advertised.clone();
    borrowed[1].signature = advertised[0].signature.clone();
    borrowed[1].certificate_pem = advertised[0].certificate_pem.clone();
    let err = clients[0]
        .round_share_keys(share(borrowed))
        .await
        .unwrap_err();
    assert!(
        err.message().contains(&format!(
            "its certificate names `{}`, not `{}`",
            ids[0], ids[1]
        )),
        "{}",
        err.message()
    );
    // A coordinator that can issue certificates makes one in the second
    // node's name for a key of its own and vouches for keys with it: every
    // node pins its members' keys (`secure_aggregation.member_keys`) and
    // refuses it (issue 38 (4)(b)).
    let ca = federation.pki.load_ca().unwrap();
    let impostor = ca
        .issue(&ghx_pki::CertificateRequest::new(
            &ids[1],
            ghx_pki::Role::Node,
            "Impostor",
        ))
        .unwrap();
    let theirs = ghx_proto::round::advertise_from_wire(advertised[1].clone()).unwrap();
    let mut forged = advertised.clone();
    forged[1].signature =
        ghx_pki::signed::sign(&impostor.key_pem, &theirs.statement(&round)).unwrap();
    forged[1].certificate_pem = impostor.cert_pem.clone();
    let err = clients[0]
        .round_share_keys(share(forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains(&format!(
            "its certificate's key is not the one pinned for `{}`",
            ids[1]
        )),
        "{}",
        err.message()
    );
    // The keys as the nodes signed them are taken.
    let shares = clients[0]
        .round_share_keys(share(advertised.clone()))
        .await
        .unwrap()
        .into_inner()
        .shares;
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].to, ids[1]);

    // A session for the run's rounds: a moments phase, or no run, is
    // refused; the members' keys must be signed by their nodes; each round
    // number is masked once, in order.
    let session = "attack/session".to_owned();
    let session_len = ghx_learn::federated::session_len(spec.features.len(), spec.param_count());
    let open = |phase: &str, session: &str| pb::RoundAdvertiseRequest {
        capability: fresh_token(),
        manifest_json: manifest_json.clone(),
        training_json: training_json.clone(),
        params: Some(pb::RoundParams {
            round: session.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: session_len as u32,
        }),
        phase: phase.to_owned(),
        run: "run-attack".to_owned(),
    };
    let err = clients[0]
        .session_open(open("moments", "attack/other"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("a session trains"),
        "{}",
        err.message()
    );
    let err = clients[0]
        .session_open(pb::RoundAdvertiseRequest {
            run: String::new(),
            ..open("train", "attack/other")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("a session trains a run"),
        "{}",
        err.message()
    );
    // Nor is a training round outside a session: its model would be the
    // coordinator's.
    let err = clients[0]
        .round_advertise(pb::RoundAdvertiseRequest {
            run: String::new(),
            ..open("train", "attack/one-off")
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("only in a run's session"),
        "{}",
        err.message()
    );
    let mut keys = Vec::new();
    for client in &mut clients {
        let k = client
            .session_open(open("train", &session))
            .await
            .unwrap()
            .into_inner()
            .keys
            .unwrap();
        assert!(!k.signature.is_empty());
        keys.push(k);
    }
    let agree = |keys: Vec<pb::SessionKeys>| pb::SessionAgreeRequest {
        session: session.clone(),
        keys,
    };
    let mut swapped = keys.clone();
    swapped[1].mask_key = keys[0].mask_key.clone();
    let err = clients[0].session_agree(agree(swapped)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains(&format!("the keys advertised as {}'s are refused", ids[1])),
        "{}",
        err.message()
    );
    // A round's signature over the same bytes does not vouch for them.
    let mut round_signed = keys.clone();
    round_signed[1].signature = advertised[1].signature.clone();
    assert!(clients[0].session_agree(agree(round_signed)).await.is_err());
    let confirmations = agreed(&mut clients, &session, &keys).await;
    // Issue 38 (3), lineage: the model a round computes from is the node's
    // own, moved by the members' signed inputs of the round before; the
    // coordinator sends none. A model sent along is ignored.
    let dim = spec.features.len();
    let ignored = ModelDocument::new(spec, &vec![0.0; dim], &vec![1.0; dim], &Model::zeros(dim));
    let input = |round: u32, previous: Option<&Evidence>| pb::SessionInputRequest {
        session: session.clone(),
        round,
        model_json: serde_json::to_vec(&ignored).unwrap(),
        previous: previous.map(ghx_proto::round::evidence_to_wire),
        confirmations: confirmations.clone(),
    };
    let certificates: Vec<String> = keys.iter().map(|k| k.certificate_pem.clone()).collect();
    let agreed: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.node.clone(), k.mask_key.clone()))
        .collect();
    let mut members = ids.clone();
    members.sort();
    // The evidence of a round, as an honest coordinator builds it.
    let evidence = |round: u32, answers: &[pb::RoundMaskedInputResponse]| Evidence {
        session: session.clone(),
        round,
        members: members.clone(),
        keys_sha256: ghx_study::lineage::keys_sha256(&agreed),
        parent: answers[0].lineage_parent.as_slice().try_into().unwrap(),
        inputs: answers
            .iter()
            .zip(&certificates)
            .map(|(a, certificate_pem)| SignedInput {
                node: a.node.clone(),
                values: a.values.clone(),
                signature: a.lineage_signature.clone(),
                certificate_pem: certificate_pem.clone(),
            })
            .collect(),
    };
    // Nothing is masked before every other member confirmed the keys this
    // node agreed (issue 38 (4)(c)): without the confirmations, or with
    // one signed by another member, round 0 is refused, and no round
    // number is used up.
    let mut forged = confirmations.clone();
    forged[1].signature = confirmations[0].signature.clone();
    for relayed in [Vec::new(), forged] {
        let err = clients[0]
            .session_input(pb::SessionInputRequest {
                confirmations: relayed,
                ..input(0, None)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains(&format!(
                "{} did not confirm the keys this node agreed",
                ids[1]
            )),
            "{}",
            err.message()
        );
    }
    // Round 1 before the moments: nothing to compute it from.
    let err = clients[0].session_input(input(1, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("needs the evidence of the round before"),
        "{}",
        err.message()
    );
    // Round 0, the moments, starts the run's lineage.
    let mut moments = Vec::new();
    for client in &mut clients {
        moments.push(
            client
                .session_input(input(0, None))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_eq!(moments[0].lineage_parent, moments[1].lineage_parent);
    assert!(moments.iter().all(|m| !m.lineage_signature.is_empty()));
    let honest = evidence(0, &moments);
    // Forged evidence of round 0 is refused, and burns no round number.
    let mut changed = honest.clone();
    changed.inputs[1].values[0] = changed.inputs[1].values[0].wrapping_add(1);
    let err = clients[0]
        .session_input(input(1, Some(&changed)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "input of {} for round 0 is refused: its signature does not verify",
            changed.inputs[1].node
        )),
        "{}",
        err.message()
    );
    let mut missing = honest.clone();
    missing.inputs.pop();
    let err = clients[0]
        .session_input(input(1, Some(&missing)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("holds no input of"),
        "{}",
        err.message()
    );
    let mut other_parent = honest.clone();
    other_parent.parent = [7; 32];
    let err = clients[0]
        .session_input(input(1, Some(&other_parent)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    let mut masked = Vec::new();
    for client in &mut clients {
        masked.push(
            client
                .session_input(input(1, Some(&honest)))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_ne!(masked[0].values, masked[1].values);
    assert_eq!(masked[0].values.len(), session_len);
    // The round redone from the same step, in a new session (as after a
    // dropped member): each node draws the same randomness from the step
    // it computes from, so the sum is the same and the coordinator learns
    // nothing new from a redo.
    let redo = "attack/session-redo".to_owned();
    let redo_confirmations = keyed_session(&mut clients, &redo, || open("train", &redo)).await;
    let mut redone = Vec::new();
    for client in &mut clients {
        redone.push(
            client
                .session_input(pb::SessionInputRequest {
                    session: redo.clone(),
                    confirmations: redo_confirmations.clone(),
                    ..input(1, Some(&honest))
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_ne!(redone[0].values, masked[0].values, "masked afresh");
    assert_eq!(
        evidence(1, &redone).sum(session_len).unwrap(),
        evidence(1, &masked).sum(session_len).unwrap()
    );
    for (again, previous) in [(1, Some(&honest)), (0, None)] {
        let err = clients[0]
            .session_input(input(again, previous))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains(&format!("round {again} was asked for after round 1")),
            "{}",
            err.message()
        );
    }
    let first = evidence(1, &masked);
    let err = clients[0]
        .session_input(pb::SessionInputRequest {
            session: "attack/unknown".to_owned(),
            ..input(2, Some(&first))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // On a session's stream the same: round 2 is answered, masked like
    // a call's; asked again, it is refused and the stream ends there.
    let mut answers = clients[0]
        .session_rounds(futures::stream::iter([
            input(2, Some(&first)),
            input(2, Some(&first)),
            input(3, None),
        ]))
        .await
        .unwrap()
        .into_inner();
    let streamed = answers.message().await.unwrap().unwrap();
    assert_eq!(streamed.node, masked[0].node);
    assert_eq!(streamed.values.len(), masked[0].values.len());
    assert_ne!(streamed.values, masked[0].values);
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("round 2 was asked for after round 2"),
        "{}",
        err.message()
    );
    assert!(matches!(answers.message().await, Ok(None) | Err(_)));
    // A run has the rounds its training declares and no more: past them,
    // honest evidence is refused too.
    let second = clients[1]
        .session_input(input(2, Some(&first)))
        .await
        .unwrap()
        .into_inner();
    let mut last = evidence(2, &[streamed, second]);
    for round in 3..=spec.rounds {
        let mut answers = Vec::new();
        for client in &mut clients {
            answers.push(
                client
                    .session_input(input(round, Some(&last)))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        last = evidence(round, &answers);
    }
    let past = spec.rounds + 1;
    let err = clients[0]
        .session_input(input(past, Some(&last)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "round {past} is past the training's last round ({})",
            spec.rounds
        )),
        "{}",
        err.message()
    );
    // A run's evaluation scores the model the node's lineage reached with
    // the run's last round, never one sent along; evidence of an earlier
    // round is refused.
    let evaluate = |round: &str| pb::RoundAdvertiseRequest {
        params: Some(pb::RoundParams {
            round: round.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: training::Phase::Evaluate.len(spec.features.len(), spec.param_count()) as u32,
        }),
        phase: "evaluate".to_owned(),
        ..open("train", round)
    };
    for (round, previous, says) in [
        (
            "attack/evaluate-early",
            Some(&first),
            "only a run's final model is evaluated",
        ),
        (
            "attack/evaluate-bare",
            None,
            "needs the evidence of the round before",
        ),
    ] {
        clients[0].round_advertise(evaluate(round)).await.unwrap();
        let err = clients[0]
            .round_masked_input(pb::RoundMaskedInputRequest {
                round: round.to_owned(),
                shares: Vec::new(),
                model_json: serde_json::to_vec(&ignored).unwrap(),
                previous: previous.map(ghx_proto::round::evidence_to_wire),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            err.message()
        );
        assert!(err.message().contains(says), "{}", err.message());
    }
    // The run's evaluation with the last round's evidence, twice (as when
    // the coordinator retries the step): each node draws its noise from
    // the run's seed, so the second releases the same counts and is not
    // charged again.
    let declared = spec.validation.unwrap().epsilon;
    let org = "Chonnam National University Medical School";
    for (attempt, round) in ["attack/evaluate-final", "attack/evaluate-again"]
        .into_iter()
        .enumerate()
    {
        let mut advertised = Vec::new();
        for client in &mut clients {
            let keys = client.round_advertise(evaluate(round)).await.unwrap();
            advertised.push(keys.into_inner().keys.unwrap());
        }
        let mut shares = Vec::new();
        for client in &mut clients {
            let dealt = client
                .round_share_keys(pb::RoundShareKeysRequest {
                    round: round.to_owned(),
                    advertised: advertised.clone(),
                })
                .await
                .unwrap();
            shares.extend(dealt.into_inner().shares);
        }
        for (client, id) in clients.iter_mut().zip(&ids) {
            let mine = shares.iter().filter(|s| &s.to == id).cloned().collect();
            client
                .round_masked_input(pb::RoundMaskedInputRequest {
                    round: round.to_owned(),
                    shares: mine,
                    model_json: Vec::new(),
                    previous: Some(ghx_proto::round::evidence_to_wire(&last)),
                })
                .await
                .unwrap();
        }
        for node in nodes {
            let spent = node.store.privacy_spent(org, &study_id).unwrap();
            assert!(
                (spent.epsilon - declared).abs() < 1e-9,
                "attempt {attempt} at {}: spent {}",
                node.profile.id,
                spent.epsilon
            );
        }
    }
    assert!(
        nodes[0].store.audit_entries().unwrap().iter().any(|e| e
            .reason
            .contains("as when first computed, and charged then")),
        "the retried evaluation says it was charged before"
    );
    // Only the coordinator opens one: another node's certificate is
    // refused before any round is read.
    let err = node_client(&federation, 0, &ids[1])
        .await
        .session_rounds(futures::stream::iter([input(4, None)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Once the session's capability has expired, its rounds are refused.
    let short = signer
        .sign(&claims_for(
            &manifest,
            &study_id,
            ids.clone(),
            &training_json,
            time::Duration::seconds(2),
        ))
        .unwrap();
    let expiring = "attack/expiring".to_owned();
    let expiring_confirmations =
        keyed_session(&mut clients, &expiring, || pb::RoundAdvertiseRequest {
            capability: short.clone(),
            ..open("train", &expiring)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = clients[0]
        .session_input(pb::SessionInputRequest {
            session: expiring.clone(),
            confirmations: expiring_confirmations,
            ..input(1, Some(&first))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("its capability has expired"),
        "{}",
        err.message()
    );
    // The first node's rows change (patients withdraw consent): the run
    // computes on one set of rows there, so the run is refused there from
    // step 1 on: its rounds redone over the new rows would differ from the
    // first by the withdrawn patients' data.
    let patients = nodes[0]
        .store
        .resources_page(Some("Patient"), None, 200)
        .unwrap();
    let first_ids: Vec<String> = patients.iter().map(|p| p.key.id.clone()).collect();
    withdraw(&federation, 0, &first_ids).await;
    let changed = "attack/session-changed".to_owned();
    let err = clients[0]
        .session_open(open("train", &changed))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("rows for the training changed since run run-attack started"),
        "{}",
        err.message()
    );
    // A new run is sealed to the rows as they are now: its moments are
    // exact sums over its training rows, whose patients and values are
    // compared like released sets with the run's before. Two hundred
    // patients fewer: a new run opens.
    let again = |session: &str| pb::RoundAdvertiseRequest {
        run: "run-again".to_owned(),
        ..open("train", session)
    };
    clients[0]
        .session_open(again("attack/again-0"))
        .await
        .unwrap();
    // One training patient's body-mass index measured again at the second
    // node: the same patients, one value changed. A new run there would
    // give the old and new values from the two runs' moments (sums and
    // squares), and is refused.
    let columns = |federation: &LocalFederation| {
        let at = rows_at(federation, spec, &manifest.purpose).swap_remove(1);
        (at.patients.train, at.patients.columns)
    };
    let (patients_before, columns_before) = columns(&federation);
    let candidates = nodes[1]
        .store
        .resources_page(Some("Patient"), None, 20)
        .unwrap();
    for patient in &candidates {
        measure_bmi(&federation, 1, &patient.key.id, 99.0).await;
        if columns(&federation).1 != columns_before {
            break;
        }
    }
    let (patients_now, columns_now) = columns(&federation);
    assert_eq!(patients_now, patients_before, "the same patients");
    assert_ne!(columns_now, columns_before, "one value changed");
    let err = clients[1]
        .session_open(again("attack/again-values"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("refused by differencing control"),
        "{}",
        err.message()
    );
    // One patient fewer at the second node (the first whose withdrawal
    // changes its training rows): a new run there would difference that
    // patient's values from the first run's moments, and is refused.
    let rows =
        |federation: &LocalFederation| rows_at(federation, spec, &manifest.purpose)[1].train.len();
    let before = rows(&federation);
    let candidates = nodes[1]
        .store
        .resources_page(Some("Patient"), None, 20)
        .unwrap();
    for patient in candidates {
        withdraw(&federation, 1, std::slice::from_ref(&patient.key.id)).await;
        if rows(&federation) < before {
            break;
        }
    }
    assert_eq!(rows(&federation), before - 1);
    let err = clients[1]
        .session_open(again("attack/again-1"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("refused by differencing control"),
        "{}",
        err.message()
    );
    assert!(
        !err.message().chars().any(|c| c.is_ascii_digit()),
        "no distance: {}",
        err.message()
    );
    federation.shutdown().await;
}
