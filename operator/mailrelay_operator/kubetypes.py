"""Types of the raw JSON the operator reads and writes: Kubernetes objects and the relay's /status.

This module only declares shapes (TypedDicts) so that pure modules and the I/O shell agree on them and
mypy checks field names. It must not hold logic, defaults or I/O: parsing lives in `spec` and `drain`,
building in `manifests`. Only the fields the operator uses are declared; Kubernetes sends more.
"""

from __future__ import annotations

from typing import Literal, TypedDict

# ---------------------------------------------------------------------------------------------------
# Common metadata
# ---------------------------------------------------------------------------------------------------


class OwnerReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool
    blockOwnerDeletion: bool


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    generation: int
    resourceVersion: str
    creationTimestamp: str
    deletionTimestamp: str | None
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]
    finalizers: list[str]


class LabelSelector(TypedDict, total=False):
    matchLabels: dict[str, str]


class Condition(TypedDict, total=False):
    """A status condition, as in metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


# ---------------------------------------------------------------------------------------------------
# MailRelay (group mailrelay.dev, version v1alpha1); camelCase as in the CRD
# ---------------------------------------------------------------------------------------------------


class UpstreamSpec(TypedDict, total=False):
    host: str
    port: int
    tls: Literal["none", "starttls", "tls"]
    credentialsSecret: str


class ReplicasSpec(TypedDict, total=False):
    min: int
    max: int
    fixed: int


class LimitsSpec(TypedDict, total=False):
    maxSessionsPerPod: int
    maxMessageSize: int | str
    maxRecipients: int


class TargetsSpec(TypedDict, total=False):
    sessionsPerPod: int
    queuePerPod: int


class StepSpec(TypedDict, total=False):
    stabilizationSeconds: int
    maxPodsPerStep: int


class ScalingSpec(TypedDict, total=False):
    intervalSeconds: int
    targets: TargetsSpec
    scaleUp: StepSpec
    scaleDown: StepSpec


class DrainSpec(TypedDict, total=False):
    timeoutSeconds: int
    onTimeout: str  # KeepWhileQueued | Remove


class PersistentSpoolSpec(TypedDict, total=False):
    size: str
    storageClassName: str


class SpoolSpec(TypedDict, total=False):
    sizeLimit: str
    persistent: PersistentSpoolSpec


class ResourceRequirements(TypedDict, total=False):
    requests: dict[str, str | int]
    limits: dict[str, str | int]


class MailRelaySpec(TypedDict, total=False):
    upstream: UpstreamSpec
    acceptFrom: list[str]
    replicas: ReplicasSpec
    limits: LimitsSpec
    scaling: ScalingSpec
    drain: DrainSpec
    maintenance: bool
    image: str
    resources: ResourceRequirements
    spool: SpoolSpec


class ScaleRecommendation(TypedDict):
    """One stored policy recommendation (status.recommendations), so a restart keeps the window."""

    at: float
    replicas: int


class MailRelayStatus(TypedDict, total=False):
    replicas: int
    readyReplicas: int
    desiredReplicas: int
    selector: str
    drainingPods: int
    sessions: int
    queueMessages: int
    lastScaleTime: str
    observedGeneration: int
    mode: Literal["Autoscale", "Fixed"]
    recommendations: list[ScaleRecommendation]
    conditions: list[Condition]


class MailRelay(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: MailRelaySpec
    status: MailRelayStatus


# ---------------------------------------------------------------------------------------------------
# Core objects (only the parts the operator builds or reads)
# ---------------------------------------------------------------------------------------------------


class ContainerPort(TypedDict, total=False):
    name: str
    containerPort: int
    protocol: str


class SecretKeySelector(TypedDict, total=False):
    name: str
    key: str
    optional: bool


class ObjectFieldSelector(TypedDict, total=False):
    fieldPath: str


class EnvVarSource(TypedDict, total=False):
    secretKeyRef: SecretKeySelector
    fieldRef: ObjectFieldSelector


class EnvVar(TypedDict, total=False):
    name: str
    value: str
    valueFrom: EnvVarSource


class HTTPGetAction(TypedDict, total=False):
    path: str
    port: int | str
    scheme: str


class Probe(TypedDict, total=False):
    httpGet: HTTPGetAction
    initialDelaySeconds: int
    periodSeconds: int
    timeoutSeconds: int
    failureThreshold: int
    successThreshold: int


class VolumeMount(TypedDict, total=False):
    name: str
    mountPath: str
    readOnly: bool


class Capabilities(TypedDict, total=False):
    drop: list[str]


class SeccompProfile(TypedDict, total=False):
    type: str


class SecurityContext(TypedDict, total=False):
    runAsNonRoot: bool
    runAsUser: int
    runAsGroup: int
    allowPrivilegeEscalation: bool
    readOnlyRootFilesystem: bool
    capabilities: Capabilities
    seccompProfile: SeccompProfile


class PodSecurityContext(TypedDict, total=False):
    runAsNonRoot: bool
    runAsUser: int
    runAsGroup: int
    fsGroup: int
    seccompProfile: SeccompProfile


class Container(TypedDict, total=False):
    name: str
    image: str
    args: list[str]
    ports: list[ContainerPort]
    env: list[EnvVar]
    readinessProbe: Probe
    livenessProbe: Probe
    startupProbe: Probe
    volumeMounts: list[VolumeMount]
    securityContext: SecurityContext
    resources: ResourceRequirements


class KeyToPath(TypedDict, total=False):
    key: str
    path: str
    mode: int


class SecretVolumeSource(TypedDict, total=False):
    secretName: str
    items: list[KeyToPath]
    defaultMode: int
    optional: bool


class EmptyDirVolumeSource(TypedDict, total=False):
    medium: str
    sizeLimit: str


class Volume(TypedDict, total=False):
    name: str
    secret: SecretVolumeSource
    emptyDir: EmptyDirVolumeSource


class TopologySpreadConstraint(TypedDict, total=False):
    maxSkew: int
    topologyKey: str
    whenUnsatisfiable: str
    labelSelector: LabelSelector


class PodSpec(TypedDict, total=False):
    containers: list[Container]
    topologySpreadConstraints: list[TopologySpreadConstraint]
    volumes: list[Volume]
    terminationGracePeriodSeconds: int
    securityContext: PodSecurityContext
    automountServiceAccountToken: bool
    enableServiceLinks: bool


class PodCondition(TypedDict, total=False):
    type: str
    status: str


class PodStatus(TypedDict, total=False):
    phase: str
    podIP: str
    conditions: list[PodCondition]


class Pod(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: PodSpec
    status: PodStatus


class PodTemplateSpec(TypedDict, total=False):
    metadata: ObjectMeta
    spec: PodSpec


class RollingUpdateDeployment(TypedDict, total=False):
    maxSurge: int | str
    maxUnavailable: int | str


class DeploymentStrategy(TypedDict, total=False):
    type: str
    rollingUpdate: RollingUpdateDeployment


class DeploymentSpec(TypedDict, total=False):
    replicas: int
    selector: LabelSelector
    template: PodTemplateSpec
    strategy: DeploymentStrategy
    revisionHistoryLimit: int


class DeploymentStatus(TypedDict, total=False):
    replicas: int
    readyReplicas: int
    updatedReplicas: int
    availableReplicas: int
    observedGeneration: int


class Deployment(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: DeploymentSpec
    status: DeploymentStatus


class VolumeResourceRequirements(TypedDict, total=False):
    requests: dict[str, str]


class PersistentVolumeClaimSpec(TypedDict, total=False):
    accessModes: list[str]
    storageClassName: str
    resources: VolumeResourceRequirements
    volumeName: str


class PersistentVolumeClaimStatus(TypedDict, total=False):
    phase: str


class PersistentVolumeClaim(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: PersistentVolumeClaimSpec
    status: PersistentVolumeClaimStatus


class StatefulSetPersistentVolumeClaimRetentionPolicy(TypedDict, total=False):
    whenDeleted: str  # Retain | Delete
    whenScaled: str


class RollingUpdateStatefulSetStrategy(TypedDict, total=False):
    partition: int
    maxUnavailable: int | str


class StatefulSetUpdateStrategy(TypedDict, total=False):
    type: str
    rollingUpdate: RollingUpdateStatefulSetStrategy


class StatefulSetSpec(TypedDict, total=False):
    replicas: int
    selector: LabelSelector
    template: PodTemplateSpec
    serviceName: str
    podManagementPolicy: str  # OrderedReady | Parallel
    updateStrategy: StatefulSetUpdateStrategy
    revisionHistoryLimit: int
    volumeClaimTemplates: list[PersistentVolumeClaim]
    persistentVolumeClaimRetentionPolicy: StatefulSetPersistentVolumeClaimRetentionPolicy


class StatefulSetStatus(TypedDict, total=False):
    replicas: int
    readyReplicas: int
    currentReplicas: int
    updatedReplicas: int
    availableReplicas: int
    observedGeneration: int


class StatefulSet(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: StatefulSetSpec
    status: StatefulSetStatus


class ServicePort(TypedDict, total=False):
    name: str
    port: int
    targetPort: int | str
    protocol: str


class ServiceSpec(TypedDict, total=False):
    type: str
    selector: dict[str, str]
    ports: list[ServicePort]


class Service(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: ServiceSpec


class Secret(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    type: str
    data: dict[str, str]
    stringData: dict[str, str]


class PodDisruptionBudgetSpec(TypedDict, total=False):
    selector: LabelSelector
    maxUnavailable: int | str
    minAvailable: int | str
    unhealthyPodEvictionPolicy: str


class PodDisruptionBudget(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: PodDisruptionBudgetSpec


class NetworkPolicyPort(TypedDict, total=False):
    port: int | str
    protocol: str


class NetworkPolicyPeer(TypedDict, total=False):
    podSelector: LabelSelector
    namespaceSelector: LabelSelector


# `from` is a Python keyword, hence the functional TypedDict syntax.
NetworkPolicyIngressRule = TypedDict(
    "NetworkPolicyIngressRule",
    {"from": list[NetworkPolicyPeer], "ports": list[NetworkPolicyPort]},
    total=False,
)


class NetworkPolicySpec(TypedDict, total=False):
    podSelector: LabelSelector
    policyTypes: list[str]
    ingress: list[NetworkPolicyIngressRule]


class NetworkPolicy(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: NetworkPolicySpec


# ---------------------------------------------------------------------------------------------------
# Relay admin API: GET /status (docs/contracts.md)
# ---------------------------------------------------------------------------------------------------


class RelayQueue(TypedDict, total=False):
    messages: int
    bytes: int
    oldest_age_seconds: float


class RelayDeadLetter(TypedDict, total=False):
    messages: int


class RelayStatus(TypedDict, total=False):
    draining: bool
    drained: bool
    sessions: int
    max_sessions: int
    inflight_bytes: int
    queue: RelayQueue
    dead_letter: RelayDeadLetter
    hostname: str
    version: str
