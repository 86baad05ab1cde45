// Package chartcheck holds the tests of the deployment files: the Helm chart in
// deploy/helm/elasticserve (rendered with the Helm 3 library, decoded strictly into the
// Kubernetes API types, its server settings run through the server's own config parser)
// and docker-compose.yml (the compose specification's loader). It is a module of its own
// so that the server's go.mod does not depend on Helm or Kubernetes.
package chartcheck
