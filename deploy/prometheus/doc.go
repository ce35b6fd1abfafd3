// Package prometheus holds cleanwalld's Prometheus files: the scrape
// configuration (cleanwall.yml) and the alerting rules (alerts.yaml) with
// their promtool unit tests (alerts_test.yaml), which alerts_test.go runs.
// Runbooks: docs/alerts.md.
package prometheus
