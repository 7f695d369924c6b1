package dra

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/common/types/traits"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregv1 "k8s.io/api/admissionregistration/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/version"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"k8s.io/apiserver/pkg/authentication/serviceaccount"
	"k8s.io/apiserver/pkg/authentication/user"
	apiservercel "k8s.io/apiserver/pkg/cel"
	"k8s.io/apiserver/pkg/cel/common"
	"k8s.io/apiserver/pkg/cel/environment"
	"k8s.io/apiserver/pkg/cel/lazy"
	"k8s.io/apiserver/pkg/cel/library"
	"k8s.io/utils/ptr"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// Why not the ValidatingAdmissionPolicy plugin itself: k8s.io/apiserver's admission
// packages (pkg/admission and all of pkg/admission/plugin/...) import
// k8s.io/component-base/tracing, which needs some fourteen modules this module does not
// require (OpenTelemetry's OTLP exporters and otelhttp, grpc-gateway, the konnectivity
// client...). So the policy is compiled and run here with the API server's CEL
// environment (k8s.io/apiserver/pkg/cel/environment, the same release as go.mod's) and
// what pkg/admission/plugin/cel (compile.go, composition.go, activation.go, condition.go)
// and pkg/admission/plugin/policy/validating (plugin.go's compilePolicy, validator.go)
// build on it, mirrored below: the variables object, oldObject, request (typed as the
// plugin types it), namespace, params, authorizer and variables (composited, lazily
// evaluated), and the decisions of Validate.

// admissionRequestType is pkg/admission/plugin/cel's BuildRequestType: the CEL type of
// the request variable.
func admissionRequestType() *apiservercel.DeclType {
	field := func(name string, t *apiservercel.DeclType, required bool) *apiservercel.DeclField {
		return apiservercel.NewDeclField(name, t, required, nil, nil)
	}
	fields := func(fs ...*apiservercel.DeclField) map[string]*apiservercel.DeclField {
		m := make(map[string]*apiservercel.DeclField, len(fs))
		for _, f := range fs {
			m[f.Name] = f
		}
		return m
	}
	gvk := apiservercel.NewObjectType("kubernetes.GroupVersionKind", fields(
		field("group", apiservercel.StringType, true),
		field("version", apiservercel.StringType, true),
		field("kind", apiservercel.StringType, true),
	))
	gvr := apiservercel.NewObjectType("kubernetes.GroupVersionResource", fields(
		field("group", apiservercel.StringType, true),
		field("version", apiservercel.StringType, true),
		field("resource", apiservercel.StringType, true),
	))
	userInfo := apiservercel.NewObjectType("kubernetes.UserInfo", fields(
		field("username", apiservercel.StringType, false),
		field("uid", apiservercel.StringType, false),
		field("groups", apiservercel.NewListType(apiservercel.StringType, -1), false),
		field("extra", apiservercel.NewMapType(apiservercel.StringType, apiservercel.NewListType(apiservercel.StringType, -1), -1), false),
	))
	return apiservercel.NewObjectType("kubernetes.AdmissionRequest", fields(
		field("kind", gvk, true),
		field("resource", gvr, true),
		field("subResource", apiservercel.StringType, false),
		field("requestKind", gvk, true),
		field("requestResource", gvr, true),
		field("requestSubResource", apiservercel.StringType, false),
		field("name", apiservercel.StringType, true),
		field("namespace", apiservercel.StringType, false),
		field("operation", apiservercel.StringType, true),
		field("userInfo", userInfo, true),
		field("dryRun", apiservercel.BoolType, false),
		field("options", apiservercel.DynType, false),
	))
}

// declType is composition.go's convertCelTypeToDeclType: a variable's type in the
// variables object.
func declType(t *cel.Type) *apiservercel.DeclType {
	switch t {
	case nil:
		return apiservercel.DynType
	case cel.AnyType:
		return apiservercel.AnyType
	case cel.BoolType:
		return apiservercel.BoolType
	case cel.BytesType:
		return apiservercel.BytesType
	case cel.DoubleType:
		return apiservercel.DoubleType
	case cel.DurationType:
		return apiservercel.DurationType
	case cel.IntType:
		return apiservercel.IntType
	case cel.NullType:
		return apiservercel.NullType
	case cel.StringType:
		return apiservercel.StringType
	case cel.TimestampType:
		return apiservercel.TimestampType
	case cel.UintType:
		return apiservercel.UintType
	}
	if t.HasTrait(traits.ContainerType) && t.HasTrait(traits.IndexerType) {
		switch p := t.Parameters(); len(p) {
		case 1:
			return apiservercel.NewListType(declType(p[0]), -1)
		case 2:
			return apiservercel.NewMapType(declType(p[0]), declType(p[1]), -1)
		}
	}
	return apiservercel.DynType
}

// celPolicy is a ValidatingAdmissionPolicy compiled as the plugin compiles it.
type celPolicy struct {
	failurePolicy admissionregv1.FailurePolicyType
	varsType      *apiservercel.DeclType
	variables     []celProgram
	matchConds    []celProgram
	validations   []celProgram
	messages      []*celProgram // of validations[i], if it has a messageExpression
	messageTexts  []string      // the validations' messages
}

type celProgram struct {
	name, expr string
	prog       cel.Program
}

// compilePolicy compiles p in the base environment of Kubernetes release ver, in mode
// (environment.NewExpressions: as the API server checks a policy it is given;
// StoredExpressions: as it runs a stored one), and returns the compilation errors.
func compilePolicy(p *admissionregv1.ValidatingAdmissionPolicy, ver *version.Version, mode environment.Type) (*celPolicy, []error) {
	cp := &celPolicy{failurePolicy: admissionregv1.Fail}
	if p.Spec.FailurePolicy != nil {
		cp.failurePolicy = *p.Spec.FailurePolicy
	}
	// NewCompositedCompiler: the variables object, its fields added as variables compile.
	cp.varsType = apiservercel.NewObjectType("kubernetes.variables", map[string]*apiservercel.DeclField{})
	composited, err := environment.MustBaseEnvSet(ver).Extend(environment.VersionedOptions{
		IntroducedVersion: version.MajorMinor(1, 0),
		EnvOptions:        []cel.EnvOption{cel.Variable("variables", cp.varsType.CelType())},
		DeclTypes:         []*apiservercel.DeclType{cp.varsType},
	})
	if err != nil {
		return nil, []error{err}
	}
	// createEnvForOpts: the admission variables, with the authorizer or without (message
	// expressions), params only with a paramKind.
	reqType := admissionRequestType()
	envFor := func(authorizer bool) (*cel.Env, error) {
		opts := []cel.EnvOption{
			cel.Variable("object", cel.DynType),
			cel.Variable("oldObject", cel.DynType),
			// The plugin types namespace (BuildNamespaceType); the policy does not use it.
			cel.Variable("namespace", cel.DynType),
			cel.Variable("request", reqType.CelType()),
		}
		if p.Spec.ParamKind != nil {
			opts = append(opts, cel.Variable("params", cel.DynType))
		}
		if authorizer {
			opts = append(opts, cel.Variable("authorizer", library.AuthorizerType),
				cel.Variable("authorizer.requestResource", library.ResourceCheckType))
		}
		set, err := composited.Extend(environment.VersionedOptions{
			IntroducedVersion: version.MajorMinor(1, 0),
			EnvOptions:        opts,
			DeclTypes:         []*apiservercel.DeclType{reqType},
		}, environment.StrictCostOpt)
		if err != nil {
			return nil, err
		}
		return set.Env(mode)
	}
	withAuthz, err := envFor(true)
	if err != nil {
		return nil, []error{err}
	}
	withoutAuthz, err := envFor(false)
	if err != nil {
		return nil, []error{err}
	}
	var errs []error
	// compile is compile.go's CompileCELExpression: compile, check the output type, make
	// the program.
	compile := func(env *cel.Env, what, name, expr string, want *cel.Type) (celProgram, *cel.Type) {
		ast, iss := env.Compile(expr)
		if iss.Err() != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", what, name, iss.Err()))
			return celProgram{name: name, expr: expr}, nil
		}
		if want != nil && !ast.OutputType().IsExactType(want) {
			errs = append(errs, fmt.Errorf("%s %s: must evaluate to %v, not %v", what, name, want, ast.OutputType()))
		}
		prog, err := env.Program(ast, cel.InterruptCheckFrequency(celconfig.CheckFrequency))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", what, name, err))
		}
		return celProgram{name: name, expr: expr, prog: prog}, ast.OutputType()
	}
	for _, v := range p.Spec.Variables {
		prog, t := compile(withAuthz, "variable", v.Name, v.Expression, nil)
		cp.varsType.Fields[v.Name] = apiservercel.NewDeclField(v.Name, declType(t), true, nil, nil)
		cp.variables = append(cp.variables, prog)
	}
	for _, m := range p.Spec.MatchConditions {
		prog, _ := compile(withAuthz, "matchCondition", m.Name, m.Expression, cel.BoolType)
		cp.matchConds = append(cp.matchConds, prog)
	}
	for i, v := range p.Spec.Validations {
		prog, _ := compile(withAuthz, "validation", fmt.Sprint(i), v.Expression, cel.BoolType)
		cp.validations = append(cp.validations, prog)
		cp.messageTexts = append(cp.messageTexts, v.Message)
		var msg *celProgram
		if v.MessageExpression != "" {
			m, _ := compile(withoutAuthz, "messageExpression", fmt.Sprint(i), v.MessageExpression, cel.StringType)
			msg = &m
		}
		cp.messages = append(cp.messages, msg)
	}
	if len(p.Spec.AuditAnnotations) > 0 || p.Spec.ParamKind != nil {
		errs = append(errs, errors.New("audit annotations and params are not mirrored here"))
	}
	return cp, errs
}

// admissionRequest is condition.go's CreateAdmissionRequest for a request on a
// cluster-scoped resource whose kind and resource are the ones the policy matched.
func admissionRequest(op admissionv1.Operation, gvk metav1.GroupVersionKind, gvr metav1.GroupVersionResource, name string, u user.Info) *admissionv1.AdmissionRequest {
	ui := authenticationv1.UserInfo{Username: u.GetName(), UID: u.GetUID(), Groups: u.GetGroups(), Extra: map[string]authenticationv1.ExtraValue{}}
	for k, v := range u.GetExtra() {
		ui.Extra[k] = v
	}
	var opts runtime.Object
	switch op {
	case admissionv1.Create:
		opts = &metav1.CreateOptions{}
	case admissionv1.Update:
		opts = &metav1.UpdateOptions{}
	case admissionv1.Delete:
		opts = &metav1.DeleteOptions{}
	}
	return &admissionv1.AdmissionRequest{
		Kind: gvk, Resource: gvr, RequestKind: &gvk, RequestResource: &gvr,
		Name: name, Operation: op, UserInfo: ui, DryRun: ptr.To(false),
		Options: runtime.RawExtension{Object: opts},
	}
}

type verdict int

const (
	notMatched verdict = iota // a matchCondition is false: the policy does not apply
	admitted
	denied
)

func (v verdict) String() string { return [...]string{"not matched", "admitted", "denied"}[v] }

// admit evaluates the policy on a request as validator.go's Validate does (with its
// match conditions as matchconditions' Matcher does): obj and oldObj are the unstructured
// contents of the new and old object (nil where the operation has none). It returns the
// verdict, the denials' messages, the evaluation errors and the runtime cost.
func (cp *celPolicy) admit(ctx context.Context, req *admissionv1.AdmissionRequest, obj, oldObj map[string]any) (verdict, []string, []error, int64) {
	var cost int64
	activation := map[string]any{
		"object":    nil,
		"oldObject": nil,
		"params":    nil,
		"namespace": nil, // cluster-scoped
		"request":   common.SchemalessTypedToVal(req),
	}
	if obj != nil {
		activation["object"] = types.DefaultTypeAdapter.NativeToValue(obj)
	}
	if oldObj != nil {
		activation["oldObject"] = types.DefaultTypeAdapter.NativeToValue(oldObj)
	}
	// The variables, evaluated lazily on first use (composition.go's variableAccessor).
	vars := lazy.NewMapValue(cp.varsType.CelType())
	for _, v := range cp.variables {
		vars.Append(v.name, func(*lazy.MapValue) ref.Val {
			if v.prog == nil {
				return types.NewErr("composited variable %q fails to compile", v.name)
			}
			val, det, err := v.prog.ContextEval(ctx, activation)
			if det != nil && det.ActualCost() != nil {
				cost += int64(*det.ActualCost())
			}
			if err != nil {
				return types.NewErr("composited variable %q fails to evaluate: %v", v.name, err)
			}
			return val
		})
	}
	activation["variables"] = vars
	eval := func(p celProgram) (ref.Val, error) {
		if p.prog == nil {
			return nil, fmt.Errorf("%q does not compile", p.expr)
		}
		val, det, err := p.prog.ContextEval(ctx, activation)
		if det != nil && det.ActualCost() != nil {
			cost += int64(*det.ActualCost())
		}
		if err != nil {
			return nil, fmt.Errorf("expression '%v' resulted in error: %w", p.expr, err)
		}
		return val, nil
	}
	fail := func(errs []error) (verdict, []string, []error, int64) {
		if cp.failurePolicy == admissionregv1.Ignore {
			return admitted, nil, errs, cost
		}
		return denied, nil, errs, cost
	}

	// Match conditions: one false and the policy does not apply; else an error fails.
	var errs []error
	for _, m := range cp.matchConds {
		val, err := eval(m)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("matchCondition %s: %w", m.name, err))
		case val != types.True:
			return notMatched, nil, nil, cost
		}
	}
	if len(errs) > 0 {
		return fail(errs)
	}
	// Validations: an error fails (failurePolicy); false denies, with the message
	// expression's result if it is a one-line string, else the message, else the expression.
	got, msgs := admitted, []string(nil)
	for i, v := range cp.validations {
		val, err := eval(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("validation %d: %w", i, err))
			if cp.failurePolicy != admissionregv1.Ignore {
				got = denied
			}
			continue
		}
		if val == types.True {
			continue
		}
		got = denied
		msg := ""
		if m := cp.messages[i]; m != nil {
			if mv, err := eval(*m); err == nil {
				if s, ok := mv.Value().(string); ok && !strings.Contains(strings.TrimSpace(s), "\n") {
					msg = strings.TrimSpace(s)
				}
			} else {
				errs = append(errs, fmt.Errorf("messageExpression %d: %w", i, err))
			}
		}
		if msg == "" {
			msg = strings.TrimSpace(cp.messageTexts[i])
		}
		if msg == "" {
			msg = "failed expression: " + strings.TrimSpace(v.expr)
		}
		msgs = append(msgs, msg)
	}
	return got, msgs, errs, cost
}

// ruleMatches is the plugin's matchConstraints check for the policy's rules (no
// selectors, no exclusions, no resourceNames: TestAdmissionPolicy checks it has none),
// as webhook/predicates/rules' Matcher does for a cluster-scoped resource.
func ruleMatches(rules []admissionregv1.NamedRuleWithOperations, op admissionregv1.OperationType, gvr metav1.GroupVersionResource) bool {
	in := func(list []string, s string) bool { return slices.Contains(list, s) || slices.Contains(list, "*") }
	for _, r := range rules {
		ops := make([]string, len(r.Operations))
		for i, o := range r.Operations {
			ops[i] = string(o)
		}
		scope := admissionregv1.AllScopes
		if r.Scope != nil {
			scope = *r.Scope
		}
		if in(ops, string(op)) && in(r.APIGroups, gvr.Group) && in(r.APIVersions, gvr.Version) && in(r.Resources, gvr.Resource) &&
			(scope == admissionregv1.AllScopes || scope == admissionregv1.ClusterScope) {
			return true
		}
	}
	return false
}

// TestAdmissionPolicy compiles validatingadmissionpolicy.yaml's CEL (its variables,
// matchConditions, validations and messageExpressions) in the API server's CEL
// environment, as the ValidatingAdmissionPolicy plugin compiles it (see above for what is
// mirrored, and why), and evaluates it on ResourceSlice writes: the plugin may create,
// update and delete its own node's slices and no other node's; other users' requests are
// not the policy's business.
//
// Not the API server's here: the authorizer (none: the policy does not use the
// authorizer variable, which would be unbound), the type check against the resource's
// OpenAPI schema (the API server's schemas are not a module here; the expressions are
// compiled against dynamic objects, as the plugin runs them), and the matchConstraints
// (ruleMatches, a plain reading of the policy's one rule).
func TestAdmissionPolicy(t *testing.T) {
	var (
		policy  *admissionregv1.ValidatingAdmissionPolicy
		binding *admissionregv1.ValidatingAdmissionPolicyBinding
		sa      *corev1.ServiceAccount
	)
	for _, objs := range decodeManifests(t) {
		for _, o := range objs {
			switch o := o.(type) {
			case *admissionregv1.ValidatingAdmissionPolicy:
				policy = o
			case *admissionregv1.ValidatingAdmissionPolicyBinding:
				binding = o
			case *corev1.ServiceAccount:
				sa = o
			}
		}
	}
	if policy == nil || binding == nil || sa == nil {
		t.Fatalf("deploy/kubernetes lacks the policy (%v), its binding (%v) or the service account (%v)", policy != nil, binding != nil, sa != nil)
	}
	if binding.Spec.PolicyName != policy.Name || binding.Spec.ParamRef != nil || binding.Spec.MatchResources != nil ||
		!slices.Equal(binding.Spec.ValidationActions, []admissionregv1.ValidationAction{admissionregv1.Deny}) {
		t.Fatalf("the binding does not deny by policy %s everywhere: %+v", policy.Name, binding.Spec)
	}
	mc := policy.Spec.MatchConstraints
	if mc == nil || mc.NamespaceSelector != nil || mc.ObjectSelector != nil || len(mc.ExcludeResourceRules) > 0 || len(mc.ResourceRules) != 1 || len(mc.ResourceRules[0].ResourceNames) > 0 {
		t.Fatalf("the policy's matchConstraints are not one plain rule, which ruleMatches reads: %+v", mc)
	}
	if fp := policy.Spec.FailurePolicy; fp == nil || *fp != admissionregv1.Fail {
		t.Errorf("failurePolicy %q, want Fail: a policy that cannot be evaluated must not admit", ptr.Deref(fp, ""))
	}

	// New expressions as the API server checks them when the policy is created: on the
	// oldest release that serves the manifests' resource.k8s.io/v1 (1.34) and on the
	// compatibility version of go.mod's k8s.io/apiserver.
	for _, v := range []*version.Version{version.MajorMinor(1, 34), environment.DefaultCompatibilityVersion()} {
		if _, errs := compilePolicy(policy, v, environment.NewExpressions); len(errs) > 0 {
			t.Errorf("the policy does not compile for Kubernetes %s: %v", v, errs)
		}
	}
	cp, errs := compilePolicy(policy, environment.DefaultCompatibilityVersion(), environment.StoredExpressions)
	if len(errs) > 0 {
		t.Fatalf("the policy does not compile: %v", errs)
	}

	// ResourceSlices as the plugin's resourceslice controller writes them: generated
	// names, owned by the Node, a pool named after the node and the node's devices.
	ivshmem := &brokerv1.Device{Bdf: "0000:03:00.0", VendorId: 0x1af4, DeviceId: 0x1110, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 1 << 20, Mem: true, Prefetch: true, Addr64: true}}}
	ts, err := targets(ivshmem, nil)
	if err != nil {
		t.Fatal(err)
	}
	dev := resourceDevice(ivshmem, ts[0], nil)
	sliceName := func(node string) string { return "0-" + DriverName + "-" + node + "-x7k2p" }
	slice := func(node string, generation int64) map[string]any {
		s := &resourceapi.ResourceSlice{
			TypeMeta: metav1.TypeMeta{APIVersion: resourceapi.SchemeGroupVersion.String(), Kind: "ResourceSlice"},
			ObjectMeta: metav1.ObjectMeta{
				Name:         sliceName(node),
				GenerateName: "0-" + DriverName + "-" + node + "-",
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node,
					UID: k8stypes.UID("uid-" + node), Controller: ptr.To(true)}},
			},
			Spec: resourceapi.ResourceSliceSpec{
				Driver:   DriverName,
				Pool:     resourceapi.ResourcePool{Name: node, Generation: generation, ResourceSliceCount: 1},
				NodeName: ptr.To(node),
				Devices:  []resourceapi.Device{dev},
			},
		}
		if node == "" { // a slice for all nodes
			s.Spec.NodeName, s.Spec.AllNodes = nil, ptr.To(true)
			s.Spec.Pool.Name = "everywhere"
		}
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(s)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	// The plugin's user as the API server authenticates the bound service account token
	// of its pod (k8s.io/apiserver/pkg/authentication/serviceaccount: the token's pod and
	// node become the user's extra); node "" is a token without them (a legacy
	// secret-based token).
	plugin := func(node string) user.Info {
		u := &user.DefaultInfo{
			Name:   serviceaccount.MakeUsername(sa.Namespace, sa.Name),
			UID:    "sa-uid",
			Groups: append(serviceaccount.MakeGroupNames(sa.Namespace), user.AllAuthenticated),
			Extra:  map[string][]string{user.CredentialIDKey: {"JTI=0f1e2d3c"}},
		}
		if node != "" {
			u.Extra[serviceaccount.PodNameKey] = []string{"mmiobroker-dra-abcde"}
			u.Extra[serviceaccount.PodUIDKey] = []string{"pod-uid"}
			u.Extra[serviceaccount.NodeNameKey] = []string{node}
			u.Extra[serviceaccount.NodeUIDKey] = []string{"uid-" + node}
		}
		return u
	}
	emptyNode := plugin("node-a")
	emptyNode.GetExtra()[serviceaccount.NodeNameKey] = []string{}
	kubelet := &user.DefaultInfo{Name: "system:node:node-b", Groups: []string{user.NodesGroup, user.AllAuthenticated}}
	otherDriver := &user.DefaultInfo{Name: serviceaccount.MakeUsername("gpu", "gpu-dra"),
		Groups: append(serviceaccount.MakeGroupNames("gpu"), user.AllAuthenticated),
		Extra:  map[string][]string{serviceaccount.NodeNameKey: {"node-a"}}}

	gvr := metav1.GroupVersionResource{Group: resourceapi.GroupName, Version: "v1", Resource: "resourceslices"}
	gvk := metav1.GroupVersionKind{Group: resourceapi.GroupName, Version: "v1", Kind: "ResourceSlice"}
	const otherNode = "the plugin on node node-a may not write ResourceSlices of node node-b"
	for _, tc := range []struct {
		name        string
		op          admissionv1.Operation
		user        user.Info
		obj, oldObj map[string]any
		want        verdict
		message     string // of the denial, if not empty
	}{
		{name: "create own", op: admissionv1.Create, user: plugin("node-a"), obj: slice("node-a", 1), want: admitted},
		{name: "update own", op: admissionv1.Update, user: plugin("node-a"), obj: slice("node-a", 2), oldObj: slice("node-a", 1), want: admitted},
		{name: "delete own", op: admissionv1.Delete, user: plugin("node-a"), oldObj: slice("node-a", 1), want: admitted},
		{name: "create another node's", op: admissionv1.Create, user: plugin("node-a"), obj: slice("node-b", 1), want: denied, message: otherNode},
		{name: "update another node's", op: admissionv1.Update, user: plugin("node-a"), obj: slice("node-b", 2), oldObj: slice("node-b", 1), want: denied, message: otherNode},
		{name: "delete another node's", op: admissionv1.Delete, user: plugin("node-a"), oldObj: slice("node-b", 1), want: denied, message: otherNode},
		{name: "create a slice for all nodes", op: admissionv1.Create, user: plugin("node-a"), obj: slice("", 1), want: denied,
			message: "the plugin on node node-a may not write ResourceSlices of node"},
		{name: "token without node", op: admissionv1.Create, user: plugin(""), obj: slice("node-a", 1), want: denied,
			message: "no node name in the plugin's credentials: it must use the bound service account token of a pod"},
		// An empty list of node names: [0] of the optional list is none, not an error.
		{name: "empty node name extra", op: admissionv1.Create, user: emptyNode, obj: slice("node-a", 1), want: denied,
			message: "no node name in the plugin's credentials: it must use the bound service account token of a pod"},
		{name: "kubelet deletes another node's", op: admissionv1.Delete, user: kubelet, oldObj: slice("node-a", 1), want: notMatched},
		{name: "another driver creates another node's", op: admissionv1.Create, user: otherDriver, obj: slice("node-b", 1), want: notMatched},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !ruleMatches(mc.ResourceRules, admissionregv1.OperationType(tc.op), gvr) {
				t.Fatalf("the policy's rule does not match %s on %s", tc.op, gvr.Resource)
			}
			name := ""
			for _, o := range []map[string]any{tc.obj, tc.oldObj} {
				if o != nil {
					name = o["metadata"].(map[string]any)["name"].(string)
				}
			}
			got, msgs, errs, cost := cp.admit(context.Background(), admissionRequest(tc.op, gvk, gvr, name, tc.user), tc.obj, tc.oldObj)
			if got != tc.want {
				t.Fatalf("%v, want %v (messages %q, errors %v)", got, tc.want, msgs, errs)
			}
			if tc.message != "" && !slices.Contains(msgs, tc.message) {
				t.Errorf("denied with %q, want %q", msgs, tc.message)
			}
			if len(errs) > 0 {
				t.Errorf("evaluation errors: %v", errs)
			}
			if cost > celconfig.RuntimeCELCostBudget {
				t.Errorf("runtime cost %d over the API server's budget %d", cost, celconfig.RuntimeCELCostBudget)
			}
			t.Logf("%v %q %v (cost %d)", got, msgs, errs, cost)
		})
	}
	// The policy is about ResourceSlices alone.
	for _, res := range []string{"resourceclaims", "resourceclaimtemplates", "deviceclasses"} {
		if ruleMatches(mc.ResourceRules, admissionregv1.Create, metav1.GroupVersionResource{Group: resourceapi.GroupName, Version: "v1", Resource: res}) {
			t.Errorf("the policy matches %s", res)
		}
	}
}
