package dra

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourceapi "k8s.io/api/resource/v1"
	apiresource "k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/dynamic-resource-allocation/cel"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

const manifestDir = "../../deploy/kubernetes"

// decodeManifests decodes every YAML document under deploy/kubernetes strictly into its
// k8s.io/api type, and KubeVirt's (kubevirt.io/v1) into the local mirror kubevirtVMI: an
// unknown or duplicate field, an unknown kind or a document that is not an object fails.
func decodeManifests(t *testing.T) map[string][]any {
	t.Helper()
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	out := map[string][]any{}
	err := filepath.WalkDir(manifestDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		r := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err
			}
			if onlyComments(doc) {
				continue
			}
			if vmi, ok, err := decodeKubeVirt(doc); ok || err != nil {
				if err != nil {
					t.Errorf("%s, document %d: %v", path, i, err)
				} else {
					out[path] = append(out[path], vmi)
				}
				continue
			}
			obj, _, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s, document %d: %v", path, i, err)
				continue
			}
			out[path] = append(out[path], obj)
		}
		if len(out[path]) == 0 {
			t.Errorf("%s: no object", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// kubevirtVMI mirrors the fields of a kubevirt.io/v1 VirtualMachineInstance that
// examples/kubevirt-vmi.yaml uses, and no others (KubeVirt's Go types are not a module
// here). The JSON names are KubeVirt's, from kubevirt/kubevirt
// staging/src/kubevirt.io/api/core/v1: types.go (VirtualMachineInstanceSpec.Domain,
// Volumes, ResourceClaims; VirtualMachineInstanceResourceClaim, before v1.9.0 the pod's
// PodResourceClaim, with the same JSON) and schema.go (DomainSpec.Memory, .Devices;
// Memory.Guest; Devices.Disks, .HostDevices; Disk's inline DiskDevice.Disk; DiskTarget.Bus;
// HostDevice.Name, .DeviceName and its inline ClaimRequest: claimName, requestName;
// Volume's inline VolumeSource.ContainerDisk; ContainerDiskSource.Image), identical from
// v1.6.0, which introduced the DRA fields, to v1.9.0.
type kubevirtVMI struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		ResourceClaims []kubevirtResourceClaim `json:"resourceClaims,omitempty"`
		Domain         struct {
			Memory *struct {
				Guest *apiresource.Quantity `json:"guest,omitempty"`
			} `json:"memory,omitempty"`
			Devices struct {
				Disks []struct {
					Name string `json:"name"`
					Disk *struct {
						Bus string `json:"bus,omitempty"`
					} `json:"disk,omitempty"`
				} `json:"disks,omitempty"`
				HostDevices []kubevirtHostDevice `json:"hostDevices,omitempty"`
			} `json:"devices"`
		} `json:"domain"`
		Volumes []kubevirtVolume `json:"volumes,omitempty"`
	} `json:"spec"`
}

type kubevirtVolume struct {
	Name          string `json:"name"`
	ContainerDisk *struct {
		Image string `json:"image"`
	} `json:"containerDisk,omitempty"`
}

type kubevirtResourceClaim struct {
	Name                      string  `json:"name"`
	ResourceClaimName         *string `json:"resourceClaimName,omitempty"`
	ResourceClaimTemplateName *string `json:"resourceClaimTemplateName,omitempty"`
}

// kubevirtHostDevice is KubeVirt's HostDevice: a device plugin's (deviceName) or, with
// claimName and requestName, a DRA one (the HostDevicesWithDRA feature gate).
type kubevirtHostDevice struct {
	Name        string `json:"name"`
	DeviceName  string `json:"deviceName,omitempty"`
	ClaimName   string `json:"claimName,omitempty"`
	RequestName string `json:"requestName,omitempty"`
}

// decodeKubeVirt decodes doc strictly into kubevirtVMI if it is a kubevirt.io object
// (ok), and fails on any other kubevirt.io kind. Strictly: sigs.k8s.io/yaml's
// UnmarshalStrict (duplicate keys and, with encoding/json's DisallowUnknownFields,
// unknown fields fail), then the decoded struct must encode back to the document
// (encoding/json matches names case-insensitively: "ClaimName" would have passed).
func decodeKubeVirt(doc []byte) (vmi *kubevirtVMI, ok bool, err error) {
	var tm metav1.TypeMeta
	if err := utilyaml.Unmarshal(doc, &tm); err != nil {
		return nil, false, err
	}
	gv, err := schema.ParseGroupVersion(tm.APIVersion)
	if err != nil || gv.Group != "kubevirt.io" {
		return nil, false, nil
	}
	if tm.APIVersion != "kubevirt.io/v1" || tm.Kind != "VirtualMachineInstance" {
		return nil, true, fmt.Errorf("%s %s: only kubevirt.io/v1 VirtualMachineInstance is mirrored", tm.APIVersion, tm.Kind)
	}
	vmi = &kubevirtVMI{}
	if err := utilyaml.UnmarshalStrict(doc, vmi); err != nil {
		return nil, true, err
	}
	var want, got map[string]any
	if err := utilyaml.Unmarshal(doc, &want); err != nil {
		return nil, true, err
	}
	j, err := json.Marshal(vmi)
	if err != nil {
		return nil, true, err
	}
	if err := utilyaml.Unmarshal(j, &got); err != nil {
		return nil, true, err
	}
	if d := cmp.Diff(want, got); d != "" {
		return nil, true, fmt.Errorf("the VirtualMachineInstance does not round-trip through its mirror (-document +mirror):\n%s", d)
	}
	return vmi, true, nil
}

func onlyComments(doc []byte) bool {
	for _, l := range bytes.Split(doc, []byte("\n")) {
		l = bytes.TrimSpace(l)
		if len(l) > 0 && l[0] != '#' && string(l) != "---" {
			return false
		}
	}
	return true
}

// TestManifests: deploy/kubernetes decodes strictly, its parts fit together (the
// DaemonSet's paths, service account, RBAC and admission policy name the same things),
// and the CEL selectors of its DeviceClasses and examples compile and select the devices
// they say they select, as the plugin publishes them.
func TestManifests(t *testing.T) {
	var (
		ds        *appsv1.DaemonSet
		sa        *corev1.ServiceAccount
		binding   *rbacv1.ClusterRoleBinding
		role      *rbacv1.ClusterRole
		vap       *admissionv1.ValidatingAdmissionPolicy
		classes   = map[string]*resourceapi.DeviceClass{}
		templates = map[string]*resourceapi.ResourceClaimTemplate{}
		pods      []*corev1.Pod
		vmis      []*kubevirtVMI
	)
	for _, objs := range decodeManifests(t) {
		for _, o := range objs {
			switch o := o.(type) {
			case *appsv1.DaemonSet:
				ds = o
			case *corev1.ServiceAccount:
				sa = o
			case *rbacv1.ClusterRoleBinding:
				binding = o
			case *rbacv1.ClusterRole:
				role = o
			case *admissionv1.ValidatingAdmissionPolicy:
				vap = o
			case *resourceapi.DeviceClass:
				classes[o.Name] = o
			case *resourceapi.ResourceClaimTemplate:
				templates[o.Name] = o
			case *corev1.Pod:
				pods = append(pods, o)
			case *kubevirtVMI:
				vmis = append(vmis, o)
			}
		}
	}
	if ds == nil || sa == nil || binding == nil || role == nil || vap == nil || len(classes) < 4 || len(templates) == 0 || len(pods) == 0 || len(vmis) == 0 {
		t.Fatalf("deploy/kubernetes lacks objects: daemonset %v, service account %v, binding %v, role %v, policy %v, %d classes, %d templates, %d pods, %d VMIs",
			ds != nil, sa != nil, binding != nil, role != nil, vap != nil, len(classes), len(templates), len(pods), len(vmis))
	}

	// The DaemonSet: the host paths are the same inside; its service account is the bound one.
	spec := ds.Spec.Template.Spec
	if spec.ServiceAccountName != sa.Name || ds.Namespace != sa.Namespace {
		t.Errorf("daemonset runs as %s/%s, the service account is %s/%s", ds.Namespace, spec.ServiceAccountName, sa.Namespace, sa.Name)
	}
	vols := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			vols[v.Name] = v.HostPath.Path
		}
	}
	mounted := map[string]bool{}
	for _, m := range spec.Containers[0].VolumeMounts {
		if vols[m.Name] != m.MountPath {
			t.Errorf("volume %s: host path %q mounted at %q: the kubelet and runtime use the plugin's paths, they must be equal", m.Name, vols[m.Name], m.MountPath)
		}
		mounted[m.MountPath] = true
	}
	for _, p := range []string{"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins/" + DriverName, DefaultCDIDir, filepath.Dir(DefaultContainerClaimSock)} {
		if !mounted[p] {
			t.Errorf("daemonset does not mount %s", p)
		}
	}
	if s := binding.Subjects; len(s) != 1 || s[0].Name != sa.Name || s[0].Namespace != sa.Namespace || binding.RoleRef.Name != role.Name {
		t.Errorf("cluster role binding %+v does not bind %s to %s", binding, sa.Name, role.Name)
	}
	user := "system:serviceaccount:" + sa.Namespace + ":" + sa.Name
	if len(vap.Spec.MatchConditions) != 1 || !strings.Contains(vap.Spec.MatchConditions[0].Expression, `"`+user+`"`) {
		t.Errorf("admission policy does not match the plugin's user %s: %+v", user, vap.Spec.MatchConditions)
	}

	// The selectors against devices as the plugin publishes them.
	ivshmem := &brokerv1.Device{Bdf: "0000:03:00.0", VendorId: 0x1af4, DeviceId: 0x1110, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 1 << 20, Mem: true, Prefetch: true, Addr64: true}}}
	gpu := &brokerv1.Device{Bdf: "0000:41:00.0", VendorId: 0x10de, DeviceId: 0x2330, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 64 << 30, Mem: true, Prefetch: true, Addr64: true}},
		Tsm:  &brokerv1.TsmState{Present: true, Connect: "tsm0", Bound: "tsm0"},
		Policy: &brokerv1.DevicePolicy{AllowedKinds: []brokerv1.LeaseKind{
			brokerv1.LeaseKind_LEASE_KIND_SHARED, brokerv1.LeaseKind_LEASE_KIND_PRIVATE}}}
	quarter := &brokerv1.Device{Bdf: "0000:04:00.0", VendorId: 0x1af4, DeviceId: 0x1110, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 4 << 20, Mem: true}}}
	devs := map[string]resourceapi.Device{}
	for _, d := range []*brokerv1.Device{ivshmem, gpu, quarter} {
		parts := []Partition{{BDF: quarter.Bdf, BAR: 2, Count: 4}}
		ts, err := targets(d, parts)
		if err != nil {
			t.Fatal(err)
		}
		devs[d.Bdf] = resourceDevice(d, ts[0], nil)
	}
	matches := func(what string, sel []resourceapi.DeviceSelector) map[string]bool {
		out := map[string]bool{}
		for bdf, d := range devs {
			out[bdf] = true
			for _, s := range sel {
				res := cel.GetCompiler(cel.Features{}).CompileCELExpression(s.CEL.Expression, cel.Options{})
				if res.Error != nil {
					t.Fatalf("%s: %v", what, res.Error)
				}
				ok, _, err := res.DeviceMatches(context.Background(), cel.Device{Driver: DriverName, Attributes: d.Attributes, Capacity: d.Capacity})
				if err != nil {
					t.Fatalf("%s on %s: %v", what, d.Name, err)
				}
				out[bdf] = out[bdf] && ok
			}
		}
		return out
	}
	for name, want := range map[string][]string{
		DriverName:                               {ivshmem.Bdf, gpu.Bdf, quarter.Bdf},
		"large-prefetchable.mmio.mmiobroker.dev": {gpu.Bdf},
		"private.mmio.mmiobroker.dev":            {gpu.Bdf},
		"ivshmem.mmio.mmiobroker.dev":            {ivshmem.Bdf, quarter.Bdf},
	} {
		c := classes[name]
		if c == nil {
			t.Errorf("no DeviceClass %s", name)
			continue
		}
		got := matches("DeviceClass "+name, c.Spec.Selectors)
		for bdf, ok := range got {
			if ok != slices.Contains(want, bdf) {
				t.Errorf("DeviceClass %s on %s: %v, want %v", name, devs[bdf].Name, ok, !ok)
			}
		}
	}
	// The private class configures private leases, as the plugin decodes its config.
	pc := classes["private.mmio.mmiobroker.dev"]
	var cfg []resourceapi.DeviceAllocationConfiguration
	for _, c := range pc.Spec.Config {
		cfg = append(cfg, resourceapi.DeviceAllocationConfiguration{Source: resourceapi.AllocationConfigSourceClass, DeviceConfiguration: c.DeviceConfiguration})
	}
	if k, err := leaseKind(cfg, "any"); err != nil || k != brokerv1.LeaseKind_LEASE_KIND_PRIVATE {
		t.Errorf("the private class's config gives lease kind %v, %v", k, err)
	}

	// The examples: every claim comes from a template of deploy/kubernetes whose requests
	// select the whole ivshmem BAR alone; the launcher pod's container uses the pod's
	// claims; the VMI's DRA host devices name its claims and their templates' requests,
	// and the launcher pod is what virt-controller makes of the VMI.
	claimTemplates := func(owner, ns string, claims []corev1.PodResourceClaim) map[string]*resourceapi.ResourceClaimTemplate {
		out := map[string]*resourceapi.ResourceClaimTemplate{}
		for _, c := range claims {
			if c.ResourceClaimTemplateName == nil || c.ResourceClaimName != nil {
				t.Fatalf("%s: claim %s is not from a template alone (a claim shared by pods cannot be prepared)", owner, c.Name)
			}
			tmpl := templates[*c.ResourceClaimTemplateName]
			if tmpl == nil || tmpl.Namespace != ns {
				t.Fatalf("%s: claim %s from template %s/%s, which is not in deploy/kubernetes", owner, c.Name, ns, *c.ResourceClaimTemplateName)
			}
			for _, r := range tmpl.Spec.Spec.Devices.Requests {
				class := classes[r.Exactly.DeviceClassName]
				if class == nil {
					t.Fatalf("template %s: no DeviceClass %s", tmpl.Name, r.Exactly.DeviceClassName)
				}
				got := matches("template "+tmpl.Name, append(slices.Clone(class.Spec.Selectors), r.Exactly.Selectors...))
				if !got[ivshmem.Bdf] || got[quarter.Bdf] || got[gpu.Bdf] {
					t.Errorf("template %s request %s selects %v, want the whole ivshmem BAR alone", tmpl.Name, r.Name, got)
				}
			}
			out[c.Name] = tmpl
		}
		return out
	}
	for _, p := range pods {
		claimTemplates("pod "+p.Name, p.Namespace, p.Spec.ResourceClaims)
		uses := false
		for _, ctr := range p.Spec.Containers {
			for _, rc := range ctr.Resources.Claims {
				uses = uses || slices.ContainsFunc(p.Spec.ResourceClaims, func(c corev1.PodResourceClaim) bool { return c.Name == rc.Name })
			}
		}
		if !uses {
			t.Errorf("pod %s: no container uses its claims", p.Name)
		}
	}
	for _, vmi := range vmis {
		what := "VirtualMachineInstance " + vmi.Metadata.Name
		// virt-controller: the launcher pod's spec.resourceClaims are the VMI's
		// (pkg/dra ToPodResourceClaims), its compute container's resources.claims one
		// {claimName, requestName} per DRA GPU or host device
		// (pkg/virt-controller/services WithHostDevicesDRA).
		var podClaims []corev1.PodResourceClaim
		for _, c := range vmi.Spec.ResourceClaims {
			podClaims = append(podClaims, corev1.PodResourceClaim{Name: c.Name, ResourceClaimName: c.ResourceClaimName, ResourceClaimTemplateName: c.ResourceClaimTemplateName})
		}
		tmpls := claimTemplates(what, vmi.Metadata.Namespace, podClaims)
		var computeClaims []corev1.ResourceClaim
		for _, hd := range vmi.Spec.Domain.Devices.HostDevices {
			if hd.ClaimName == "" && hd.RequestName == "" {
				continue
			}
			// KubeVirt takes a host device for a DRA one if it has a claim request and no deviceName.
			if hd.DeviceName != "" || hd.ClaimName == "" || hd.RequestName == "" {
				t.Errorf("%s: host device %s is half DRA: deviceName %q, claimName %q, requestName %q", what, hd.Name, hd.DeviceName, hd.ClaimName, hd.RequestName)
				continue
			}
			tmpl := tmpls[hd.ClaimName]
			if tmpl == nil {
				t.Errorf("%s: host device %s uses claim %s, not one of spec.resourceClaims", what, hd.Name, hd.ClaimName)
				continue
			}
			if !slices.ContainsFunc(tmpl.Spec.Spec.Devices.Requests, func(r resourceapi.DeviceRequest) bool { return r.Name == hd.RequestName }) {
				t.Errorf("%s: host device %s uses request %s, which template %s does not have", what, hd.Name, hd.RequestName, tmpl.Name)
			}
			computeClaims = append(computeClaims, corev1.ResourceClaim{Name: hd.ClaimName, Request: hd.RequestName})
		}
		if len(computeClaims) == 0 {
			t.Errorf("%s: no DRA host device", what)
		}
		for _, d := range vmi.Spec.Domain.Devices.Disks {
			if !slices.ContainsFunc(vmi.Spec.Volumes, func(v kubevirtVolume) bool { return v.Name == d.Name }) {
				t.Errorf("%s: disk %s has no volume", what, d.Name)
			}
		}
		// The launcher pod example: the pod virt-controller makes of this VMI (its
		// vm.kubevirt.io/name label is the VMI's host name, by default its name).
		var launcher *corev1.Pod
		for _, p := range pods {
			if p.Namespace == vmi.Metadata.Namespace && p.Labels["vm.kubevirt.io/name"] == vmi.Metadata.Name {
				launcher = p
			}
		}
		if launcher == nil {
			t.Errorf("%s: no launcher pod example", what)
			continue
		}
		if d := cmp.Diff(podClaims, launcher.Spec.ResourceClaims); d != "" {
			t.Errorf("pod %s's claims are not %s's (-VMI +pod):\n%s", launcher.Name, what, d)
		}
		i := slices.IndexFunc(launcher.Spec.Containers, func(c corev1.Container) bool { return c.Name == "compute" })
		if i < 0 {
			t.Errorf("pod %s: no compute container", launcher.Name)
		} else if d := cmp.Diff(computeClaims, launcher.Spec.Containers[i].Resources.Claims); d != "" {
			t.Errorf("pod %s: the compute container's claims are not %s's DRA host devices (-VMI +pod):\n%s", launcher.Name, what, d)
		}
	}
}
