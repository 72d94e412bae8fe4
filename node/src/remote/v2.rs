//! The StateFun v2 wire protocol as a translation of the v3 messages: `TypedValue` ⇄
//! `google.protobuf.Any` (`typename` ⇄ `type_url`), state values as plain bytes. One internal
//! message type and one response path serve both generations.

use statemesh_proto::statefun_v2 as v2;
use statemesh_proto::statefun_v3 as v3;
use statemesh_sdk::StateSlot;

fn address(a: v3::Address) -> v2::Address {
    v2::Address {
        namespace: a.namespace,
        r#type: a.r#type,
        id: a.id,
    }
}

fn address_back(a: v2::Address) -> v3::Address {
    v3::Address {
        namespace: a.namespace,
        r#type: a.r#type,
        id: a.id,
    }
}

fn any(v: v3::TypedValue) -> v2::Any {
    v2::Any {
        type_url: v.typename,
        value: v.value,
    }
}

fn typed(a: v2::Any) -> v3::TypedValue {
    v3::TypedValue {
        typename: a.type_url,
        has_value: true,
        value: a.value,
    }
}

/// A v3 request as v2: every state as bytes (empty when absent), arguments as `Any`.
pub(crate) fn request(r: v3::ToFunction) -> v2::ToFunction {
    let Some(v3::to_function::Request::Invocation(b)) = r.request else {
        return v2::ToFunction { request: None };
    };
    v2::ToFunction {
        request: Some(v2::to_function::Request::Invocation(
            v2::to_function::InvocationBatchRequest {
                target: b.target.map(address),
                state: b
                    .state
                    .into_iter()
                    .map(|s| v2::to_function::PersistedValue {
                        state_name: s.state_name,
                        state_value: s
                            .state_value
                            .filter(|v| v.has_value)
                            .map(|v| v.value)
                            .unwrap_or_default(),
                    })
                    .collect(),
                invocations: b
                    .invocations
                    .into_iter()
                    .map(|i| v2::to_function::Invocation {
                        caller: i.caller.map(address),
                        argument: i.argument.map(any),
                    })
                    .collect(),
            },
        )),
    }
}

/// A v2 response as v3. State mutations carry the registered typename of their state (v2
/// states are untyped bytes); a mutation of an unknown state keeps an empty typename and is
/// refused by the common path.
pub(crate) fn response(r: v2::FromFunction, state: &[StateSlot]) -> v3::FromFunction {
    let Some(v2::from_function::Response::InvocationResult(r)) = r.response else {
        return v3::FromFunction { response: None };
    };
    let typename_of = |name: &str| {
        state
            .iter()
            .find(|s| &*s.name == name)
            .map(|s| s.typename.to_string())
            .unwrap_or_default()
    };
    v3::FromFunction {
        response: Some(v3::from_function::Response::InvocationResult(
            v3::from_function::InvocationResponse {
                state_mutations: r
                    .state_mutations
                    .into_iter()
                    .map(|m| v3::from_function::PersistedValueMutation {
                        mutation_type: m.mutation_type,
                        state_value: Some(v3::TypedValue {
                            typename: typename_of(&m.state_name),
                            has_value: true,
                            value: m.state_value,
                        }),
                        state_name: m.state_name,
                    })
                    .collect(),
                outgoing_messages: r
                    .outgoing_messages
                    .into_iter()
                    .map(|m| v3::from_function::Invocation {
                        target: m.target.map(address_back),
                        argument: m.argument.map(typed),
                    })
                    .collect(),
                delayed_invocations: r
                    .delayed_invocations
                    .into_iter()
                    .map(|d| v3::from_function::DelayedInvocation {
                        is_cancellation_request: false,
                        cancellation_token: String::new(),
                        delay_in_ms: d.delay_in_ms,
                        target: d.target.map(address_back),
                        argument: d.argument.map(typed),
                    })
                    .collect(),
                outgoing_egresses: r
                    .outgoing_egresses
                    .into_iter()
                    .map(|e| v3::from_function::EgressMessage {
                        egress_namespace: e.egress_namespace,
                        egress_type: e.egress_type,
                        argument: e.argument.map(typed),
                    })
                    .collect(),
            },
        )),
    }
}
