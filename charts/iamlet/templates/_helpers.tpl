{{/* The chart's name. */}}
{{- define "iamlet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name alone when it already says iamlet. */}}
{{- define "iamlet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* What selects iamlet's pods. */}}
{{- define "iamlet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iamlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Every object's labels. */}}
{{- define "iamlet.labels" -}}
{{ include "iamlet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "iamlet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "iamlet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* --host-interface: host.interface, else the CNI's, else auto. */}}
{{- define "iamlet.hostInterface" -}}
{{- $byCni := dict "aws-vpc-cni" "eni+,vlan+" "calico" "cali+" "cilium" "lxc+" "flannel" "cni0" "kube-router" "kube-bridge" "weave" "weave" -}}
{{- if .Values.host.interface -}}
{{- .Values.host.interface -}}
{{- else if .Values.cni -}}
{{- required (printf "cni %q is not one of aws-vpc-cni, calico, cilium, flannel, kube-router, weave" .Values.cni) (get $byCni .Values.cni) -}}
{{- else -}}
auto
{{- end -}}
{{- end -}}

{{/*
The agent's flags: the chart's own, each left out when extraArgs sets the same flag (iamlet
refuses a flag given twice), then extraArgs as kube2iam's chart renders them.
*/}}
{{- define "iamlet.args" -}}
{{- $extra := .Values.extraArgs -}}
{{- $flags := list "--node=$(NODE_NAME)" (printf "--host-ip=%s" .Values.host.ip) -}}
{{- if and .Values.host.iptables (not (hasKey $extra "iptables")) }}{{ $flags = append $flags "--iptables" }}{{ end -}}
{{- if and (ne (int .Values.host.port) 8181) (not (hasKey $extra "app-port")) }}{{ $flags = append $flags (printf "--app-port=%d" (int .Values.host.port)) }}{{ end -}}
{{- if and (ne (int .Values.prometheus.metricsPort) 8182) (not (hasKey $extra "metrics-port")) }}{{ $flags = append $flags (printf "--metrics-port=%d" (int .Values.prometheus.metricsPort)) }}{{ end -}}
{{- if not (or (hasKey $extra "base-role-arn") (hasKey $extra "auto-discover-base-arn")) -}}
{{- if .Values.baseRoleArn }}{{ $flags = append $flags (printf "--base-role-arn=%s" .Values.baseRoleArn) }}{{ else if .Values.autoDiscoverBaseArn }}{{ $flags = append $flags "--auto-discover-base-arn" }}{{ end -}}
{{- end -}}
{{- if and .Values.defaultRole (not (hasKey $extra "default-role")) }}{{ $flags = append $flags (printf "--default-role=%s" .Values.defaultRole) }}{{ end -}}
{{- if and .Values.regionalStsEndpoint (not (hasKey $extra "use-regional-sts-endpoint")) }}{{ $flags = append $flags "--use-regional-sts-endpoint" }}{{ end -}}
{{- if and .Values.podEvents (not (hasKey $extra "pod-events")) }}{{ $flags = append $flags "--pod-events" }}{{ end -}}
{{- if and .Values.namespaceRestrictions.enabled (not (hasKey $extra "namespace-restrictions")) }}{{ $flags = append $flags "--namespace-restrictions" }}{{ end -}}
{{- if and (ne .Values.namespaceRestrictions.format "glob") (not (hasKey $extra "namespace-restriction-format")) }}{{ $flags = append $flags (printf "--namespace-restriction-format=%s" .Values.namespaceRestrictions.format) }}{{ end -}}
{{- if and .Values.serviceAccountRoles (not (hasKey $extra "service-account-roles")) }}{{ $flags = append $flags "--service-account-roles" }}{{ end -}}
{{- if and .Values.sessionTags.enabled (not (hasKey $extra "session-tags")) }}{{ $flags = append $flags "--session-tags" }}{{ end -}}
{{- if and .Values.sessionTags.clusterName (not (hasKey $extra "cluster-name")) }}{{ $flags = append $flags (printf "--cluster-name=%s" .Values.sessionTags.clusterName) }}{{ end -}}
{{- if and .Values.assumeRoleArn (not (hasKey $extra "assume-role-arn")) }}{{ $flags = append $flags (printf "--assume-role-arn=%s" .Values.assumeRoleArn) }}{{ end -}}
{{- if and .Values.requireImdsv2 (not (hasKey $extra "require-imdsv2")) }}{{ $flags = append $flags "--require-imdsv2" }}{{ end -}}
{{- if and (ne .Values.startupTaint "iamlet.io/agent-not-ready") (not (hasKey $extra "startup-taint")) }}{{ $flags = append $flags (printf "--startup-taint=%s" .Values.startupTaint) }}{{ end -}}
{{- if not (hasKey $extra "log-format") }}{{ $flags = append $flags (printf "--log-format=%s" .Values.logFormat) }}{{ end -}}
{{- if not (hasKey $extra "shutdown-grace-period") }}{{ $flags = append $flags (printf "--shutdown-grace-period=%s" .Values.shutdownGracePeriod) }}{{ end -}}
{{- range $name, $value := $extra }}{{ $flags = append $flags (printf "--%s=%v" $name $value) }}{{ end -}}
{{- toYaml $flags -}}
{{- end -}}
