"""The public contract's fixed names: labels, annotations, object names.

Every other module imports these; nothing else spells them out.
"""

from __future__ import annotations

DOMAIN = "kvmesh.dev"
PREFIX = DOMAIN + "/"

# Opt-in is a label (not an annotation) so the webhook configuration's objectSelector keeps
# every other pod away from the webhook.
LABEL_INJECT = PREFIX + "inject"
INJECT_ENABLED = "enabled"
INJECT_DISABLED = "disabled"

ANN_MODE = PREFIX + "mode"
ANN_CONTAINER = PREFIX + "container"
ANN_ALLOW_PARALLEL = PREFIX + "allow-parallel"
ANN_GROUP = PREFIX + "group"
ANN_CPU_CACHE_GB = PREFIX + "cpu-cache-gb"
# "true": the user vouches that the image runs LMCache's V1 connector where kvmesh's image
# facts say it cannot (a custom build).
ANN_IMAGE_SUPPORTED = PREFIX + "image-supported"
ANN_STATUS = PREFIX + "status"
# mp mode: "all" gives the server sidecar every GPU of the node (docs/mp-mode.md §3, opt-in).
ANN_MP_GPU_VISIBILITY = PREFIX + "mp-gpu-visibility"
# Written by the controller on Deployments/StatefulSets; read there, accepted on pods too.
ANN_INJECT = PREFIX + "inject"

MODE_REDIS = "redis"
MODE_CONTROLLER = "controller"
# LMCache's multiprocess generation (issue 11; docs/mp-mode.md): a per-pod `lmcache server`
# sidecar and one `lmcache coordinator` per group.
MODE_MP = "mp"
MODES = (MODE_REDIS, MODE_CONTROLLER, MODE_MP)
MP_SIDECAR = "kvm-lmcache-server"
# The sidecar's emptyDir (survives its restarts, not the pod's): the incarnation counter.
MP_STATE_VOLUME = "kvm-mp-state"
MP_STATE_DIR = "/kvm-mp"
# The sidecar's own view of the pod (downward API); referenced as $(VAR) in its args.
MP_POD_IP_VAR = "POD_IP"
MP_POD_UID_VAR = "POD_UID"
# `lmcache coordinator`'s default HTTP port; the Service kvmesh-mp-<group> exposes it.
COORDINATOR_PORT = 9300

DEFAULT_GROUP = "default"

# Names of containerPorts kvmesh declares (<= 15 chars, IANA_SVC_NAME rules).
PORT_NAME_DISTRIBUTED = "kvm-dist"
PORT_NAME_INIT = "kvm-init-{rank}"
PORT_NAME_LOOKUP = "kvm-look-{rank}"
PORT_NAME_WORKER = "kvm-work-{rank}"
PORT_NAME_MP_RPC = "kvm-mp-rpc"
PORT_NAME_MP_P2P = "kvm-mp-p2p"
PORT_NAME_PREFIX = "kvm-"

# The env variable kvmesh adds for the pod IP when the container has none of its own.
POD_IP_VAR = "KVMESH_POD_IP"


# Least privilege: the controller writes (lookup objects, NetworkPolicies, KVMeshPeerGroups,
# workload opt-in labels) only in namespaces whose admin bound this ClusterRole to its
# ServiceAccount with a RoleBinding (manifests/20-rbac.yaml).
CONTROLLER_SERVICE_ACCOUNT = "kvmesh-controller"
TENANT_CLUSTER_ROLE = "kvmesh-controller-tenant"


def grant_command(namespace: str) -> str:
    """The exact command an admin runs to let kvmesh manage peer groups in ``namespace``."""
    return (f"kubectl create rolebinding {TENANT_CLUSTER_ROLE} -n {namespace} "
            f"--clusterrole={TENANT_CLUSTER_ROLE} "
            f"--serviceaccount={SYSTEM_NAMESPACE}:{CONTROLLER_SERVICE_ACCOUNT}")


# Secret in SYSTEM_NAMESPACE holding the master key kvmesh derives each group Redis's password
# from (core.lookup.redis_password); the controller creates it.
REDIS_AUTH_SECRET = "kvmesh-redis-auth"
# The key of the per-group PYTHONHASHSEEDs (kvmesh.core.hashseed); created by the controller,
# read by the webhook. Apart from the Redis key so the webhook never holds Redis passwords.
HASH_SEED_SECRET = "kvmesh-hash-seed"

# LMCache's published images. The lmcache_controller image of a controller-mode group whose
# members' tags name no LMCache version, unless a policy's controllerImage says otherwise (the
# LMCache release of manifests/samples/).
LMCACHE_IMAGE_REPO = "lmcache/vllm-openai"
LMCACHE_CONTROLLER_IMAGE = LMCACHE_IMAGE_REPO + ":v0.3.9"
# The `lmcache coordinator` image of an mp-mode group whose members' tags name no LMCache
# >= 0.5.0, unless a policy's controllerImage says otherwise: the LMCache release whose wheel
# the project's consumer tests run (0.5.6).
LMCACHE_MP_IMAGE = LMCACHE_IMAGE_REPO + ":v0.5.6"


def lookup_service_name(mode: str, group: str) -> str:
    """Name of the Service in front of a peer group's lookup service (same namespace)."""
    tier = {MODE_REDIS: "redis", MODE_MP: "mp"}.get(mode, "lmcache")
    return f"kvmesh-{tier}-{group}"


def lookup_host(mode: str, group: str, namespace: str) -> str:
    # A namespace-qualified name so pods with custom dnsConfig/searches still resolve it.
    return f"{lookup_service_name(mode, group)}.{namespace}.svc"

# --- install-time names (manifests/ uses the same) ---
SYSTEM_NAMESPACE = "kvmesh-system"
WEBHOOK_SERVICE = "kvmesh-webhook"
WEBHOOK_CONFIGURATION = "kvmesh"
WEBHOOK_POD_ENTRY = "pods.kvmesh.dev"  # pods labelled kvmesh.dev/inject=enabled
WEBHOOK_NAMESPACE_ENTRY = "namespaces.kvmesh.dev"  # unlabelled pods in enabled namespaces
CA_SECRET = "kvmesh-webhook-ca"
LEADER_LEASE = "kvmesh-controller"
# Separate server-side-apply managers: an apply declares everything its manager owns, so the
# caBundle writer and the policy-entry writer must not share one.
FIELD_MANAGER = "kvmesh-controller"  # lookup objects, peer groups
FIELD_MANAGER_CERTS = "kvmesh-certs"  # clientConfig.caBundle of every webhook entry
FIELD_MANAGER_POLICIES = "kvmesh-policies"  # the webhook entries reflecting KVMeshPolicies
FIELD_MANAGER_OPTIN = "kvmesh-optin"  # the pod-template label of annotated workloads
POLICY_ENTRY_SUFFIX = ".policies.kvmesh.dev"

# Written by the webhook on injected pods, so the controller can watch exactly its peers.
LABEL_PEER_GROUP = PREFIX + "peer-group"
# Written by the webhook on opted-in pods it skipped (value: the skip reason, a short kebab-case
# word), so the controller can watch them however they were opted in (own label, namespace
# label, KVMeshPolicy) and say so on their workload; never on an injected pod.
LABEL_SKIPPED = PREFIX + "skipped"
# On a group's lookup objects and lookup pods (value: the group id).
LABEL_LOOKUP_FOR = PREFIX + "lookup-for"
# NetworkPolicies per group (+ group id): one fences the lookup service, one the P2P ports.
LOOKUP_POLICY_PREFIX = "kvmesh-lookup-"
PEER_POLICY_PREFIX = "kvmesh-peers-"
# Per-group custom resource (namespaced) that owns the group's lookup objects.
PEER_GROUP_KIND = "KVMeshPeerGroup"
API_GROUP = "kvmesh.dev"
API_VERSION = "v1alpha1"


def mp_instance_id(pod_uid: str, incarnation: int) -> str:
    """The MP server's `--instance-id` (docs/mp-mode.md §5): the controller knows from the pod
    alone which coordinator registration belongs to which incarnation, and deletes it."""
    return f"kvm-{pod_uid}-{incarnation}"


def group_id(mode: str, group: str) -> str:
    """Label value and KVMeshPeerGroup name of a peer group, e.g. `redis-default`."""
    return f"{mode}-{group}"


# Redis `notify-keyspace-events` flags the controller's address index needs: keyevent
# notifications ('E') of string commands ('$', i.e. SET). The lookup Redis starts with them;
# the index adds them to any other Redis's setting.
REDIS_NOTIFY_FLAGS = "E$"
