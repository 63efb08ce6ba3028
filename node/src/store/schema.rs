//! Diesel table definitions; the migrations under `node/migrations/` create them.

diesel::table! {
    resources (resource_type, id) {
        resource_type -> Text,
        id -> Text,
        version_id -> BigInt,
        last_updated -> Text,
        content_sha256 -> Text,
        patient_id -> Nullable<Text>,
        content -> Text,
    }
}

diesel::table! {
    resource_history (resource_type, id, version_id) {
        resource_type -> Text,
        id -> Text,
        version_id -> BigInt,
        last_updated -> Text,
        content -> Nullable<Text>,
    }
}

diesel::table! {
    patients (id) {
        id -> Text,
        gender -> Text,
        birth_ymd -> Nullable<BigInt>,
        link_token -> Nullable<Text>,
    }
}

diesel::table! {
    condition_codes (condition_id, system, code) {
        condition_id -> Text,
        patient_id -> Text,
        system -> Text,
        code -> Text,
        onset_at -> Nullable<BigInt>,
        recorded_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    encounters (encounter_id) {
        encounter_id -> Text,
        patient_id -> Text,
        class_code -> Text,
        start_at -> Nullable<BigInt>,
        end_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    medication_codes (medication_request_id, system, code) {
        medication_request_id -> Text,
        patient_id -> Text,
        system -> Text,
        code -> Text,
        authored_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    code_map (source_system, source_code, target_system) {
        source_system -> Text,
        source_code -> Text,
        target_system -> Text,
        target_code -> Text,
    }
}

diesel::table! {
    import_checkpoints (source) {
        source -> Text,
        fingerprint -> Text,
        lines_committed -> BigInt,
        finished -> Bool,
        updated_at -> Text,
    }
}

diesel::table! {
    observation_values (observation_id, system, code) {
        observation_id -> Text,
        patient_id -> Text,
        system -> Text,
        code -> Text,
        value -> Nullable<Double>,
        unit -> Nullable<Text>,
        effective_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    consents (consent_id) {
        consent_id -> Text,
        patient_id -> Text,
        status -> Text,
        scope -> Text,
        decision -> Text,
        recorded_at -> BigInt,
        provision -> Text,
    }
}

diesel::table! {
    node_state (key) {
        key -> Text,
        value -> BigInt,
    }
}

diesel::table! {
    consent_contexts (context) {
        context -> Text,
        generation -> BigInt,
        created_at -> Text,
        summary -> Text,
    }
}

diesel::table! {
    consent_eligibility (context, patient_id) {
        context -> Text,
        patient_id -> Text,
        sensitive_mask -> BigInt,
        gender -> Text,
        birth_ymd -> Nullable<BigInt>,
        print -> BigInt,
    }
}

diesel::table! {
    capability_uses (jti) {
        jti -> Text,
        study_id -> Text,
        expires_at -> BigInt,
        used_at -> Text,
    }
}

diesel::table! {
    revoked_studies (study_id) {
        study_id -> Text,
        revoked_at -> Text,
        reason -> Text,
    }
}

diesel::table! {
    sum_participants (study_id) {
        study_id -> Text,
        participants -> Text,
        bound_at -> Text,
    }
}

diesel::table! {
    released_cohorts (seq) {
        seq -> BigInt,
        organisation -> Text,
        study_id -> Text,
        query_sha256 -> Text,
        released_at -> Text,
        size -> BigInt,
        members -> Binary,
        print_sha256 -> Text,
    }
}

diesel::table! {
    privacy_budget (organisation, study_id) {
        organisation -> Text,
        study_id -> Text,
        epsilon_spent -> Double,
        delta_spent -> Double,
        queries -> BigInt,
    }
}

diesel::table! {
    privacy_charges (capability_id) {
        capability_id -> Text,
        organisation -> Text,
        study_id -> Text,
        epsilon -> Double,
        delta -> Double,
        charged_at -> Text,
        request_sha256 -> Text,
    }
}

diesel::table! {
    view_materialisations (view_sha256) {
        view_sha256 -> Text,
        generation -> BigInt,
        row_count -> BigInt,
        built_at -> Text,
    }
}

diesel::table! {
    view_values (view_sha256, patient_id, value) {
        view_sha256 -> Text,
        patient_id -> Text,
        value -> Double,
        resource_id -> Text,
    }
}

diesel::table! {
    released_cells (seq) {
        seq -> BigInt,
        organisation -> Text,
        study_id -> Text,
        query_sha256 -> Text,
        released_at -> Text,
        size -> BigInt,
        members -> Binary,
        print_sha256 -> Text,
        exact -> Bool,
    }
}

diesel::table! {
    analysis_bounds (organisation, variable, kind) {
        organisation -> Text,
        variable -> Text,
        kind -> Text,
        bounds -> Text,
        study_id -> Text,
        fixed_at -> Text,
    }
}

diesel::table! {
    released_tables (seq) {
        seq -> BigInt,
        organisation -> Text,
        study_id -> Text,
        query_sha256 -> Text,
        released_at -> Text,
        parts -> Binary,
        parts_sha256 -> Text,
    }
}

diesel::table! {
    training_lineage (study_id, training_sha256, run_id) {
        study_id -> Text,
        training_sha256 -> Text,
        run_id -> Text,
        round -> Integer,
        head -> Text,
        model_json -> Text,
        previous_round -> Nullable<Integer>,
        previous_head -> Nullable<Text>,
        previous_model_json -> Nullable<Text>,
        updated_at -> Text,
        seed_secret -> Nullable<Text>,
        rows_sha256 -> Nullable<Text>,
    }
}

diesel::table! {
    exchange_disclosures (seq) {
        seq -> BigInt,
        patient_id -> Text,
        request_id -> Text,
        recipient -> Text,
        purpose -> Text,
        scope -> Text,
        disclosed_at -> Text,
        resources -> BigInt,
        sha256 -> Text,
        outcome -> Text,
    }
}
