// Command cleanwall-cni is cleanwall's chained CNI plugin (see package cni).
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/cleanwall/cleanwall/cni"
)

func main() {
	skel.PluginMainFuncs(cni.Funcs, cni.SupportedVersions, "cleanwall-cni: egress enforcement for clean-room sandboxes (chain after ptp or bridge)")
}
