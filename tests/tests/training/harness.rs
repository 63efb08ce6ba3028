//! A compromised coordinator host: its certificate and capability key,
//! driving rounds and sessions at the nodes itself.

use super::*;

/// A compromised coordinator host: its certificate and capability key,
/// driving one study's rounds at the nodes itself.
pub(crate) struct Compromised<'a> {
    pub(crate) federation: &'a LocalFederation,
    pub(crate) signer: ghx_study::capability::Signer,
    pub(crate) study_id: String,
    pub(crate) manifest: StudyManifest,
    pub(crate) manifest_json: Vec<u8>,
    pub(crate) training_json: Vec<u8>,
}

pub(crate) type NodeClient =
    ghx_proto::v1::node_service_client::NodeServiceClient<tonic::transport::Channel>;

/// A client of node `index` under `identity`'s certificate (the
/// coordinator's, or another member's).
pub(crate) async fn node_client(
    federation: &LocalFederation,
    index: usize,
    identity: &str,
) -> NodeClient {
    let node = &federation.nodes[index];
    let tls = ghx_pki::TlsMaterial::load(&federation.pki.tls_files(identity)).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        node.addr().port()
    ))
    .unwrap()
    .tls_config(tls.client_config(node.profile.id))
    .unwrap()
    .connect()
    .await
    .unwrap();
    NodeClient::new(channel)
}

/// Opens `session` at every client (each with a request from `request`)
/// and relays the members' keys to all: a session ready for its rounds,
/// with the members' confirmations of the keys they agreed.
pub(crate) async fn keyed_session(
    clients: &mut [NodeClient],
    session: &str,
    request: impl Fn() -> pb::RoundAdvertiseRequest,
) -> Vec<pb::SessionConfirmation> {
    let mut keys = Vec::new();
    for client in clients.iter_mut() {
        let opened = client.session_open(request()).await.unwrap().into_inner();
        keys.push(opened.keys.unwrap());
    }
    agreed(clients, session, &keys).await
}

/// Relays `keys` to every client for `session`: each member's confirmation.
pub(crate) async fn agreed(
    clients: &mut [NodeClient],
    session: &str,
    keys: &[pb::SessionKeys],
) -> Vec<pb::SessionConfirmation> {
    let mut confirmations = Vec::new();
    for (client, k) in clients.iter_mut().zip(keys) {
        let agreed = client
            .session_agree(pb::SessionAgreeRequest {
                session: session.to_owned(),
                keys: keys.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        confirmations.push(pb::SessionConfirmation {
            node: k.node.clone(),
            signature: agreed.confirmation,
        });
    }
    confirmations
}

impl<'a> Compromised<'a> {
    /// Approves the example training study and takes the coordinator's
    /// keys.
    pub(crate) async fn new(federation: &'a LocalFederation) -> Compromised<'a> {
        let study_id = federation
            .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
            .await
            .unwrap();
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
        let training_json = manifest.trainings[0].canonical_json();
        let key =
            std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
        Compromised {
            federation,
            signer: ghx_study::capability::Signer::from_pem(
                ghx::local_federation::SIGNING_KID,
                &key,
            )
            .unwrap(),
            study_id,
            manifest,
            manifest_json,
            training_json,
        }
    }

    /// Node `index`'s id.
    pub(crate) fn id(&self, index: usize) -> String {
        self.federation.nodes[index].profile.id.to_owned()
    }

    pub(crate) async fn client(&self, index: usize) -> NodeClient {
        node_client(self.federation, index, "coordinator").await
    }

    /// Step 1 of `round` (or, for `train`, a run's session) over `ids`,
    /// with a fresh capability naming them.
    pub(crate) fn advertise(
        &self,
        round: &str,
        ids: &[String],
        phase: Phase,
    ) -> pb::RoundAdvertiseRequest {
        let spec = &self.manifest.trainings[0];
        let (dim, run) = match phase {
            Phase::Train => (
                ghx_learn::federated::session_len(spec.features.len(), spec.param_count()),
                "run-attack",
            ),
            _ => (phase.len(spec.features.len(), spec.param_count()), ""),
        };
        let token = self
            .signer
            .sign(&ghx_study::capability::claims_for(
                &self.manifest,
                &self.study_id,
                ids.to_vec(),
                &self.training_json,
                time::Duration::minutes(5),
            ))
            .unwrap();
        pb::RoundAdvertiseRequest {
            capability: token,
            manifest_json: self.manifest_json.clone(),
            training_json: self.training_json.clone(),
            params: Some(pb::RoundParams {
                round: round.to_owned(),
                participants: ids.to_vec(),
                threshold: ids.len() as u32,
                dim: dim as u32,
            }),
            phase: phase.name().to_owned(),
            run: run.to_owned(),
        }
    }

    /// Steps 1 to 3 of an external validation over nodes `members` (of a
    /// model scoring everyone alike), each node sending its masked input:
    /// their clients, for step 4.
    pub(crate) async fn masked_validation(
        &self,
        round: &str,
        members: &[usize],
    ) -> Vec<NodeClient> {
        let ids: Vec<String> = members.iter().map(|i| self.id(*i)).collect();
        let mut clients = Vec::new();
        let mut advertised = Vec::new();
        for index in members {
            let mut client = self.client(*index).await;
            let keys = client
                .round_advertise(self.advertise(round, &ids, Phase::Evaluate))
                .await
                .unwrap()
                .into_inner()
                .keys
                .unwrap();
            advertised.push(keys);
            clients.push(client);
        }
        let mut shares = Vec::new();
        for client in &mut clients {
            shares.extend(
                client
                    .round_share_keys(pb::RoundShareKeysRequest {
                        round: round.to_owned(),
                        advertised: advertised.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .shares,
            );
        }
        let spec = &self.manifest.trainings[0];
        let dim = spec.features.len();
        let model = ModelDocument::new(spec, &vec![0.0; dim], &vec![1.0; dim], &Model::zeros(dim));
        for (client, id) in clients.iter_mut().zip(&ids) {
            let mine = shares.iter().filter(|s| &s.to == id).cloned().collect();
            client
                .round_masked_input(pb::RoundMaskedInputRequest {
                    round: round.to_owned(),
                    shares: mine,
                    model_json: serde_json::to_vec(&model).unwrap(),
                    previous: None,
                })
                .await
                .unwrap();
        }
        clients
    }
}
