// One schema for both backends; the two migration trees under `migrations/` must produce it.

diesel::table! {
    organisations (ods_code) {
        ods_code -> Text,
        name -> Text,
        kind -> Text,
        region -> Nullable<Text>,
        office_phone -> Nullable<Text>,
        emergency_duty_phone -> Nullable<Text>,
        email -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        org_ods -> Text,
        roles -> Text,
        key_hash -> Text,
        created_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    plans (id) {
        id -> Text,
        la_ods -> Text,
        local_reference -> Text,
        nhs_number -> Text,
        plan_type -> Text,
        start_date -> Date,
        end_date -> Nullable<Date>,
        delete_date -> Nullable<Date>,
        expected_delivery_date -> Nullable<Date>,
        given_name -> Nullable<Text>,
        family_name -> Nullable<Text>,
        birth_date -> Nullable<Date>,
        sex -> Nullable<Text>,
        postcode -> Nullable<Text>,
        office_phone -> Nullable<Text>,
        emergency_duty_phone -> Nullable<Text>,
        email -> Nullable<Text>,
        version -> Integer,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        ended_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    accesses (id) {
        id -> Text,
        nhs_number -> Text,
        at -> Timestamp,
        setting_ods -> Text,
        setting_type -> Nullable<Text>,
        kind -> Text,
        access -> Text,
        practitioner_name -> Nullable<Text>,
        practitioner_role -> Nullable<Text>,
        key_id -> Nullable<Text>,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        at -> Text,
        actor_ods -> Text,
        key_id -> Nullable<Text>,
        role -> Nullable<Text>,
        practitioner -> Nullable<Text>,
        action -> Text,
        nhs_number -> Nullable<Text>,
        subject -> Nullable<Text>,
        outcome -> Text,
        request_id -> Nullable<Text>,
        detail -> Nullable<Text>,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::table! {
    audit_head (id) {
        id -> Integer,
        last_seq -> BigInt,
        last_hash -> Text,
        first_seq -> BigInt,
        first_prev_hash -> Text,
    }
}

diesel::table! {
    persons (id) {
        id -> Text,
        nhs_number -> Nullable<Text>,
        given_name -> Nullable<Text>,
        family_name -> Nullable<Text>,
        birth_date -> Nullable<Date>,
        sex -> Nullable<Text>,
        postcode -> Nullable<Text>,
        name_key -> Nullable<Text>,
        postcode_key -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    person_identifiers (system, value) {
        system -> Text,
        value -> Text,
        region -> Text,
        person_id -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    attendances (id) {
        id -> Text,
        setting_ods -> Text,
        attendance_id -> Text,
        setting_type -> Text,
        arrived_at -> Timestamp,
        reason -> Nullable<Text>,
        nhs_number -> Nullable<Text>,
        identifier_system -> Nullable<Text>,
        identifier_value -> Nullable<Text>,
        given_name -> Nullable<Text>,
        family_name -> Nullable<Text>,
        birth_date -> Nullable<Date>,
        sex -> Nullable<Text>,
        postcode -> Nullable<Text>,
        region -> Nullable<Text>,
        match_status -> Text,
        match_method -> Nullable<Text>,
        match_score -> Nullable<Double>,
        person_id -> Nullable<Text>,
        resolved_nhs_number -> Nullable<Text>,
        flagged -> Bool,
        rematch_attempts -> Integer,
        key_id -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    delivery_endpoints (org_ods) {
        org_ods -> Text,
        emails -> Text,
        webhook_url -> Nullable<Text>,
        webhook_secret -> Nullable<Text>,
        webhook_previous_secret -> Nullable<Text>,
        previous_secret_until -> Nullable<Timestamp>,
        webhook_disabled_at -> Nullable<Timestamp>,
        events -> Text,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    notifications (id) {
        id -> Text,
        org_ods -> Text,
        event -> Text,
        status -> Text,
        review -> Bool,
        nhs_number -> Nullable<Text>,
        setting_ods -> Nullable<Text>,
        setting_type -> Nullable<Text>,
        attendance_ref -> Nullable<Text>,
        occurred_at -> Timestamp,
        payload -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    deliveries (notification_id, channel) {
        notification_id -> Text,
        channel -> Text,
        target -> Text,
        status -> Text,
        attempts -> Integer,
        next_attempt_at -> Timestamp,
        lease_until -> Nullable<Timestamp>,
        leased_by -> Nullable<Text>,
        last_error -> Nullable<Text>,
        delivered_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    delivery_attempts (id) {
        id -> Text,
        notification_id -> Text,
        channel -> Text,
        at -> Timestamp,
        outcome -> Text,
        response_code -> Nullable<Integer>,
        error -> Nullable<Text>,
        duration_ms -> BigInt,
    }
}

diesel::table! {
    job_runs (name) {
        name -> Text,
        last_tick -> Timestamp,
        last_finished -> Nullable<Timestamp>,
    }
}

diesel::joinable!(deliveries -> notifications (notification_id));
diesel::joinable!(person_identifiers -> persons (person_id));
diesel::joinable!(api_keys -> organisations (org_ods));
diesel::joinable!(plans -> organisations (la_ods));

diesel::allow_tables_to_appear_in_same_query!(
    organisations,
    api_keys,
    plans,
    accesses,
    audit_events,
    audit_head,
    persons,
    person_identifiers,
    attendances,
    delivery_endpoints,
    notifications,
    deliveries,
    delivery_attempts,
    job_runs
);
